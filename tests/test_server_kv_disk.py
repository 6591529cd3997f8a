"""ds4 serve with a disk KV cache on the real engine: a restart loads the saved
prefix instead of prefilling it, and damaged files change no answer."""
import os

import pytest
import requests

import ds4
from ds4.kv_disk import DiskKVCache
from ds4.server import ModelEngine, Server, ServerThread

# ~700 tokens of user text: above the cache's 512-token minimum, one cold save
LONG = " ".join(f"item {i} is a line of the report about the harbour." for i in range(64))


def ask(model, directory):
    """One fresh server (as after a restart) answering the same long prompt."""
    cache = DiskKVCache(directory, 256, model)
    engine = ModelEngine(model)
    st = ServerThread(Server(engine, kv_cache=cache)).start()
    try:
        r = requests.post(st.url + "/v1/chat/completions", json={
            "model": "deepseek-v4-flash", "max_tokens": 8, "temperature": 0,
            "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": LONG}]}, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
    finally:
        st.stop()
    engine.session = None
    return body["choices"][0]["message"]["content"], body["usage"]


@pytest.fixture(scope="module")
def model(tiny_q2):
    with ds4.load(tiny_q2, ctx=2048) as m:
        yield m


def test_restart_loads_the_prompt_prefix_from_disk_and_answers_the_same(model, tmp_path):
    first, u1 = ask(model, tmp_path)
    assert u1["prompt_tokens"] > 512
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    files = [f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert files, "the cold prompt was not checkpointed"
    again, u2 = ask(model, tmp_path)
    cached = u2["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 512     # loaded from disk: at most the rest was prefilled
    assert again == first


def test_corrupting_every_cache_file_changes_no_answer(model, tmp_path):
    first, _ = ask(model, tmp_path)
    names = [tmp_path / f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert names
    for path in names:
        data = bytearray(path.read_bytes())
        for at in (8, len(data) // 2, len(data) - 3):     # header, payload, checksum
            data[at] ^= 0x5A
        path.write_bytes(bytes(data))
    again, usage = ask(model, tmp_path)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert again == first

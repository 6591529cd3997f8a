"""Bad requests, disconnects, the queue limit and the disk-cache seam."""
import asyncio
import json
import socket
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import requests

import ds4
from ds4.server.turn import Turn

from test_server_support import start_harness, tiny_tokenizer  # noqa: F401

M = [{"role": "user", "content": "hi"}]
CHAT, COMPL, RESP, MSGS = ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                           "/v1/messages")


def deep(n):
    v = 0
    for _ in range(n):
        v = [v]
    return v


BAD_REQUESTS = [
    (CHAT, b"{"), (CHAT, b"not json"), (CHAT, b"[]"), (CHAT, b'"text"'), (CHAT, b"\xff\xfe{}"),
    (CHAT, {}), (CHAT, {"messages": "hi"}), (CHAT, {"messages": []}), (CHAT, {"messages": [1]}),
    (CHAT, {"messages": [{"role": 5, "content": "x"}]}),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (CHAT, {"messages": [{"role": "user", "content": [1, 2]}]}),
    (CHAT, {"messages": M, "max_tokens": "10"}), (CHAT, {"messages": M, "max_tokens": 1.5}),
    (CHAT, {"messages": M, "max_completion_tokens": True}),
    (CHAT, {"messages": M, "temperature": "hot"}), (CHAT, {"messages": M, "top_p": [1]}),
    (CHAT, {"messages": M, "top_k": 2.5}), (CHAT, {"messages": M, "stream": "yes"}),
    (CHAT, {"messages": M, "stop": 5}), (CHAT, {"messages": M, "stop": [1]}),
    (CHAT, {"messages": M, "tools": "bash"}), (CHAT, {"messages": M, "tools": [1]}),
    (CHAT, {"messages": M, "reasoning_effort": "extreme"}),
    (CHAT, {"messages": M, "think": "yes"}), (CHAT, {"messages": M, "tool_choice": 5}),
    (CHAT, {"messages": M, "stream_options": 1}), (CHAT, {"messages": M, "seed": "x"}),
    (CHAT, {"messages": M, "model": 5}),
    (CHAT, {"messages": M, "unknown_field": deep(300)}),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "pad": "'
     + b"x" * (1 << 21) + b'"}'),                                # over the 1 MiB limit
    (COMPL, {}), (COMPL, {"prompt": 5}), (COMPL, {"prompt": [1, 2]}),
    (COMPL, {"prompt": "x", "max_tokens": "x"}),
    (RESP, {}), (RESP, {"input": 5}), (RESP, {"input": [{"type": "bogus"}]}),
    (RESP, {"input": [{"type": "message", "role": "user",
                       "content": [{"type": "input_image", "image_url": "x"}]}]}),
    (RESP, {"input": "x", "previous_response_id": "resp_1"}),
    (RESP, {"input": "x", "tool_choice": "required"}),
    (RESP, {"input": "x", "tool_choice": {"type": "function", "name": "x"}}),
    (RESP, {"input": [{"type": "message", "role": "user", "content": "x",
                       "status": "in_progress"}]}),
    (RESP, {"input": "x", "reasoning": "high"}),
    (RESP, {"input": [{"type": "message", "role": "robot", "content": "x"}]}),
    (RESP, {"input": "x", "instructions": 5}),
    (MSGS, {"messages": M}),                                   # max_tokens is required
    (MSGS, {"max_tokens": 5}), (MSGS, {"max_tokens": "5", "messages": M}),
    (MSGS, {"max_tokens": 5, "messages": M, "system": 5}),
    (MSGS, {"max_tokens": 5, "messages": M, "stop_sequences": [1]}),
    (MSGS, {"max_tokens": 5, "messages": M, "tool_choice": "none"}),
    (MSGS, {"max_tokens": 5, "messages": M, "output_config": {"effort": "ultra"}}),
    (MSGS, b"{bad"),
    (MSGS, {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_gone", "content": "x"}]}]}),
    (RESP, {"input": [{"type": "function_call_output", "call_id": "call_gone",
                       "output": "x"}]}),
]


def test_fifty_malformed_requests_get_4xx_json_and_the_server_keeps_serving(tiny_tokenizer):
    assert len(BAD_REQUESTS) >= 50
    h = start_harness(tiny_tokenizer, max_body_mb=1)
    try:
        for path, body in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = h.post(path, data=body, headers={"Content-Type": "application/json"})
            else:
                r = h.post(path, body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            if len(body) > 1 << 20:
                assert r.status_code == 413
            err = r.json()
            if path == MSGS:
                assert err["type"] == "error" and err["error"]["message"], err
            else:
                assert err["error"]["message"] and err["error"]["type"], err
            assert "Traceback" not in r.text
        get = requests.get(h.url + CHAT)
        assert get.status_code == 404 and get.json()["error"]["message"] == "unknown endpoint"
        h.engine.script("</think>still here")
        ok = h.post(CHAT, {"messages": M})
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "still here"
        # nothing reached the worker but the good request
        assert len(h.engine.eval_log) == 1
    finally:
        h.thread.stop()


def raw_post(port, path, body):
    """Sends a request on a raw socket and leaves the reply unread."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def wait_until(predicate, what, timeout=20):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.01)


LONG = "word " * 400          # ~400 tokens: 8 s at the test's token delay


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation_and_frees_the_worker(tiny_tokenizer, stream):
    h = start_harness(tiny_tokenizer, engine_kw={"token_delay": 0.02, "default": LONG})
    try:
        s = raw_post(h.thread.port, CHAT, {"messages": M, "stream": stream})
        wait_until(lambda: h.engine.sampled and h.engine.sampled[0] > 3, "generation started")
        s.close()
        wait_until(lambda: not h.server.worker.busy, "worker free again")
        h.engine.script("</think>next")
        r = h.post(CHAT, {"messages": M})
        assert r.json()["choices"][0]["message"]["content"] == "next"
        full = len(tiny_tokenizer.encode(LONG)) + 1
        assert h.engine.sampled[0] < full / 2     # stopped long before the end
    finally:
        h.thread.stop()


class RecordingWorker:
    """Takes jobs and records withdrawals; runs nothing."""

    def __init__(self):
        self.jobs, self.withdrawn = [], []

    def submit(self, job):
        self.jobs.append(job)

    def withdraw(self, job):
        self.withdrawn.append(job)


@pytest.mark.parametrize("ticks", range(12))
def test_a_cancel_that_meets_a_delivered_event_still_withdraws_the_job(ticks):
    """A client that leaves as a token reaches its handler still stops the job:
    the handler is cancelled 0-11 loop turns after an event is emitted, and the
    turn ends cancelled with its job withdrawn at every one (turns 1-3 met
    asyncio.wait_for's window on Python 3.11: the cancellation was dropped and
    the job ran to its end, the CI flake of the disconnect test above)."""
    worker = RecordingWorker()
    server = SimpleNamespace(worker=worker, keepalive=30.0)
    prep = SimpleNamespace(text="", ids=[1], thinking=False, tools=None, max_tokens=8, params=None,
                           stop=[], keeps_reasoning=False, extra={})

    async def main():
        async def consume():
            async for _ in Turn(server, prep, raw=True).events():
                pass

        task = asyncio.create_task(consume())
        while not worker.jobs:
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)   # the turn waits on its queue
        worker.jobs[0].emit(("piece", "x"))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        # checked here: asyncio.run cancels what is left when main returns
        return task.cancelled(), list(worker.withdrawn)

    cancelled, withdrawn = asyncio.run(main())
    assert cancelled, "the handler's cancellation was swallowed"
    assert withdrawn == worker.jobs


def test_full_queue_answers_429_and_withdrawn_jobs_never_run(tiny_tokenizer):
    h = start_harness(tiny_tokenizer, max_queue=1,
                      engine_kw={"token_delay": 0.02, "default": LONG})
    try:
        running = raw_post(h.thread.port, CHAT, {"messages": M, "stream": True})
        wait_until(lambda: h.server.worker.busy, "first request running")
        queued = raw_post(h.thread.port, MSGS, {"messages": M, "max_tokens": 5})
        wait_until(lambda: h.server.worker.queued == 1, "second request queued")
        over = h.post(CHAT, {"messages": M})
        assert over.status_code == 429 and over.json()["error"]["message"]
        over_a = h.post(MSGS, {"messages": M, "max_tokens": 5})
        assert over_a.status_code == 429
        assert over_a.json()["error"]["type"] == "rate_limit_error"
        queued.close()
        wait_until(lambda: h.server.worker.queued == 0, "queued request withdrawn")
        running.close()
        wait_until(lambda: not h.server.worker.busy, "worker free")
        h.engine.script("</think>served")
        assert h.post(CHAT, {"messages": M}).json()["choices"][0]["message"]["content"] == \
            "served"
        assert len(h.engine.sampled) == 2      # the withdrawn request never reached the engine
    finally:
        h.thread.stop()


@dataclass
class Entry:
    tokens: list

    @property
    def n_tokens(self):
        return len(self.tokens)


class FakeKV:
    """The kv_cache interface ds4.kv_disk implements, recording its calls."""

    def __init__(self, load_ok=True):
        self.entries = []
        self.calls = []
        self.load_ok = load_ok

    def lookup(self, ids):
        hits = [e for e in self.entries if ids[:e.n_tokens] == e.tokens]
        return max(hits, key=lambda e: e.n_tokens, default=None)

    def load(self, entry, session):
        self.calls.append(("load", entry.n_tokens))
        if not self.load_ok:
            return 0
        session.rewind(0)
        session.tokens.extend(entry.tokens)
        return entry.n_tokens

    def after_prefill(self, session, ids):
        self.calls.append(("after_prefill", len(ids)))

    def before_replace(self, session):
        self.calls.append(("before_replace", session.n_tokens))

    def shutdown(self, session):
        self.calls.append(("shutdown", session.n_tokens))


@pytest.mark.parametrize("load_ok", [True, False])
def test_disk_checkpoint_is_loaded_when_it_covers_more_than_the_live_state(tiny_tokenizer,
                                                                          load_ok):
    kv = FakeKV(load_ok)
    h = start_harness(tiny_tokenizer, kv_cache=kv)
    try:
        first = h.post(CHAT, {"messages": [{"role": "user", "content": "alpha"}]}).json()
        live = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        system = "You are a careful assistant who answers questions about many topics."
        other = [{"role": "system", "content": system}, {"role": "user", "content": "beta"}]
        stored = tiny_tokenizer.encode("<｜begin▁of▁sentence｜>" + system, special=True)
        kv.entries.append(Entry(stored))
        second = h.post(CHAT, {"messages": other}).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (len(stored) if load_ok else 1)     # else only the shared BOS
        assert ("before_replace", live) in kv.calls
        assert ("load", len(stored)) in kv.calls
        assert [c for c in kv.calls if c[0] == "after_prefill"] == [
            ("after_prefill", first["usage"]["prompt_tokens"]),
            ("after_prefill", second["usage"]["prompt_tokens"])]
    finally:
        h.thread.stop()
    assert kv.calls[-1][0] == "shutdown"


class FailingEngine:
    """Wraps a ScriptedEngine; fails in prefill, or after `after` sampled tokens."""

    def __init__(self, engine, stage, after=0):
        self._e, self.stage, self.after = engine, stage, after

    def __getattr__(self, name):
        return getattr(self._e, name)

    def prefill(self, ids, progress=None, kv_cache=None):
        if self.stage == "prefill":
            raise ds4.Error("prompt processing failed")
        return self._e.prefill(ids, progress, kv_cache)

    def next_token(self, sampler, greedy=False):
        if self.stage == "decode" and self._e.sampled[-1] >= self.after:
            raise ds4.Error("decode failed")
        return self._e.next_token(sampler, greedy)


def failing_harness(tokenizer, stage):
    h = start_harness(tokenizer, engine_kw={"default": "</think>one two three four"})
    h.server.worker.engine = FailingEngine(h.engine, stage, after=2)
    return h


def test_prefill_failure_is_a_500_json_error_and_the_next_request_works(tiny_tokenizer):
    h = failing_harness(tiny_tokenizer, "prefill")
    try:
        for path, body in ((CHAT, {"messages": M, "stream": True}),
                           (MSGS, {"messages": M, "max_tokens": 5})):
            r = h.post(path, body)
            assert r.status_code == 500
            assert "prompt processing failed" in r.text and "Traceback" not in r.text
        h.server.worker.engine.stage = None
        assert h.post(CHAT, {"messages": M}).status_code == 200
    finally:
        h.thread.stop()


def test_failure_mid_stream_sends_an_error_event(tiny_tokenizer):
    h = failing_harness(tiny_tokenizer, "decode")
    try:
        r = h.post(CHAT, {"messages": M, "stream": True})
        assert r.status_code == 200
        assert "event: error\ndata: " in r.text and "decode failed" in r.text
        a = h.post(MSGS, {"messages": M, "max_tokens": 50, "stream": True})
        error = [json.loads(line[6:]) for line in a.text.splitlines()
                 if line.startswith("data: ") and '"error"' in line]
        assert error[0]["error"]["type"] == "api_error"
    finally:
        h.thread.stop()


def test_large_headers_are_accepted(tiny_tokenizer):
    h = start_harness(tiny_tokenizer)
    try:
        r = h.post(CHAT, {"messages": M}, headers={"X-Big": "b" * 30000})
        assert r.status_code == 200
    finally:
        h.thread.stop()


def test_shutdown_ends_a_running_stream_with_an_error_event(tiny_tokenizer):
    import threading
    kv = FakeKV()
    h = start_harness(tiny_tokenizer, kv_cache=kv,
                      engine_kw={"token_delay": 0.02, "default": LONG})
    got = []

    def read():
        with requests.post(h.url + CHAT, json={"messages": M, "stream": True}, stream=True,
                           timeout=60) as r:
            got.append(b"".join(r.iter_content(None)).decode())

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: h.engine.sampled and h.engine.sampled[0] > 3, "generation started")
    h.thread.stop()
    reader.join(60)
    assert "event: error" in got[0] and "shutdown requested" in got[0]
    assert h.engine.sampled[0] < len(tiny_tokenizer.encode(LONG)) / 2
    assert kv.calls[-1][0] == "shutdown"

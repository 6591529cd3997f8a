"""`ds4 download` against a local fake of the Hugging Face Hub (tests/fake_hub.py).

The command runs in a subprocess because huggingface_hub reads HF_ENDPOINT when it is imported;
the disk-space checks call ds4.download.download in-process, with the endpoint passed in, so
shutil.disk_usage can be replaced.
"""
import hashlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from conftest import default_sigint, subprocess_env
from fake_hub import FakeHub
from ds4 import download as dl
from ds4.errors import Error
from ds4.paths import KNOWN_FILES

SIZE = 3 * 1024 * 1024 + 12345
Q2 = dl.TARGETS["q2-imatrix"][0]
MTP = dl.TARGETS["mtp"][0]


@pytest.fixture(scope="module")
def payload():
    return random.Random(7).randbytes(SIZE)


@pytest.fixture
def hub(payload):
    with FakeHub({Q2: payload, MTP: payload[:100_000]}) as h:
        yield h


def child_env(hub_url, tmp_path, **extra):
    env = subprocess_env()
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "DS4_MODEL", "HF_HUB_OFFLINE"):
        env.pop(k, None)
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(tmp_path / "hf-home"),  # no saved token, no cache
               DS4_HOME=str(tmp_path / "ds4-home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def ds4_download(hub_url, tmp_path, *args, env=None, **popen):
    cmd = [sys.executable, "-m", "ds4.cli", "download", *args]
    env = env or child_env(hub_url, tmp_path)
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=tmp_path, text=True, **popen)
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ds4: ") \
        and "Traceback" not in r.stderr


def test_targets_are_the_published_file_names():
    main = {t: name for t, (name, _) in dl.TARGETS.items() if t != "mtp"}
    assert sorted(main.values()) == sorted(KNOWN_FILES)
    for target, name in main.items():
        bits = "IQ2XXS" if target.startswith("q2") else "Q4KExperts"
        assert name.startswith(f"DeepSeek-V4-Flash-{bits}")
        assert name.endswith("-imatrix.gguf") == target.endswith("-imatrix")
    assert "MTP" in dl.TARGETS["mtp"][0]


def test_full_download_equals_the_served_bytes(hub, payload, tmp_path):
    out = tmp_path / "models"
    r = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / Q2).read_bytes() == payload
    assert not (out / (Q2 + ".part")).exists()
    assert f"downloaded: {out / Q2}" in r.stdout
    assert f"ds4 run -m {out / Q2}" in r.stdout
    assert [g.range for g in hub.cdn_gets()] == [None]


def test_default_directory_is_the_models_dir_and_the_model_is_found_by_default(hub, payload,
                                                                               tmp_path):
    r = ds4_download(hub.url, tmp_path)  # no target: q2-imatrix
    assert r.returncode == 0, r.stderr
    path = tmp_path / "ds4-home" / "models" / Q2
    assert path.read_bytes() == payload
    assert "use it when no -m is given" in r.stdout


def test_a_complete_file_is_not_downloaded_again(hub, tmp_path):
    assert ds4_download(hub.url, tmp_path, "mtp").returncode == 0
    r = ds4_download(hub.url, tmp_path, "mtp")
    assert r.returncode == 0, r.stderr
    assert "already downloaded" in r.stdout and "MTP" in r.stdout
    assert len(hub.cdn_gets()) == 1


def test_a_dropped_connection_resumes_with_a_range_request(hub, payload, tmp_path):
    hub.drop_after = 1_000_000
    r = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / Q2).read_bytes() == payload
    assert [g.range for g in hub.cdn_gets()] == [None, "bytes=1000000-"]
    assert sum(g.sent for g in hub.cdn_gets()) == SIZE


def test_an_interrupted_download_resumes_with_only_the_missing_range(hub, payload, tmp_path):
    part = tmp_path / (Q2 + ".part")
    hub.stall_after = 1_500_000
    child = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        assert hub.stalled.wait(60)
        deadline = time.monotonic() + 30
        while (not part.exists() or part.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)  # what Ctrl+C sends
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130
    assert "interrupted" in err and str(part) in err and "resume" in err and "Traceback" not in err
    kept = part.stat().st_size
    assert 0 < kept <= 1_500_000
    assert part.read_bytes() == payload[:kept]
    assert not (tmp_path / Q2).exists()

    hub.release()
    first_run = len(hub.cdn_gets())
    r = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert (tmp_path / Q2).read_bytes() == payload
    second_run = hub.cdn_gets()[first_run:]
    assert [g.range for g in second_run] == [f"bytes={kept}-"]
    assert second_run[0].sent == SIZE - kept


def test_the_token_is_sent_as_a_bearer_header_but_not_to_the_cdn(payload, tmp_path):
    with FakeHub({MTP: payload}, token="hf_secret") as hub:
        r = ds4_download(hub.url, tmp_path, "mtp", "--token", "hf_secret")
        assert r.returncode == 0, r.stderr
        resolves = [q for q in hub.requests if "/resolve/" in q.path]
        assert resolves and all(q.auth == "Bearer hf_secret" for q in resolves)
        assert hub.cdn_gets() and all(q.auth is None for q in hub.cdn_gets())


def test_hf_token_from_the_environment_is_used(payload, tmp_path):
    with FakeHub({MTP: payload}, token="hf_env") as hub:
        env = child_env(hub.url, tmp_path, HF_TOKEN="hf_env")
        r = ds4_download(hub.url, tmp_path, "mtp", env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "ds4-home" / "models" / MTP).read_bytes() == payload


def test_missing_and_wrong_tokens_are_one_line_401_errors(payload, tmp_path):
    with FakeHub({MTP: payload}, token="hf_right") as hub:
        missing = ds4_download(hub.url, tmp_path, "mtp")
        wrong = ds4_download(hub.url, tmp_path, "mtp", "--token", "hf_wrong")
    assert one_line_error(missing) and "401" in missing.stderr and "--token" in missing.stderr
    assert one_line_error(wrong) and "401" in wrong.stderr and "rejected" in wrong.stderr
    assert not (tmp_path / "ds4-home" / "models").exists()


def test_a_missing_file_is_a_one_line_404_error(tmp_path):
    with FakeHub({}) as hub:
        r = ds4_download(hub.url, tmp_path, "q4")
    assert one_line_error(r) and "404" in r.stderr and dl.TARGETS["q4"][0] in r.stderr


def test_an_unreachable_hub_is_a_one_line_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = ds4_download(url, tmp_path, "mtp")
    assert one_line_error(r) and "cannot reach" in r.stderr


def test_a_size_different_from_the_announced_one_is_caught(hub, payload, tmp_path):
    hub.announced_size[Q2] = SIZE + 100
    r = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(tmp_path))
    assert one_line_error(r)
    assert f"{SIZE + 100:,}" in r.stderr and f"{SIZE:,}" in r.stderr
    assert not (tmp_path / Q2).exists()


def test_bytes_that_fail_the_sha256_check_are_deleted(hub, payload, tmp_path):
    hub.announced_sha[Q2] = hashlib.sha256(payload[::-1]).hexdigest()
    r = ds4_download(hub.url, tmp_path, "q2-imatrix", "--dir", str(tmp_path))
    assert one_line_error(r) and "sha256" in r.stderr
    assert not (tmp_path / Q2).exists() and not (tmp_path / (Q2 + ".part")).exists()


def test_a_resumed_download_is_checked_against_the_whole_file_sha256(hub, payload, tmp_path):
    part = tmp_path / (Q2 + ".part")
    part.write_bytes(b"x" + payload[1:1000])  # a partial file with one bad byte
    with pytest.raises(Error, match="sha256"):
        dl.download("q2-imatrix", directory=tmp_path, endpoint=hub.url, progress=False)
    assert [g.range for g in hub.cdn_gets()] == ["bytes=1000-"]
    assert not part.exists()


def test_a_server_that_ignores_range_gets_a_clean_restart(hub, payload, tmp_path):
    (tmp_path / (Q2 + ".part")).write_bytes(payload[:5000])
    hub.ignore_range = True
    notes = []
    result = dl.download("q2-imatrix", directory=tmp_path, endpoint=hub.url, progress=False,
                         note=notes.append)
    assert (result.fetched, result.resumed_from) == (SIZE, 0)
    assert (tmp_path / Q2).read_bytes() == payload
    assert any("starting over" in n for n in notes)


def test_an_existing_file_of_another_size_is_left_alone(hub, tmp_path):
    (tmp_path / Q2).write_bytes(b"not the model")
    with pytest.raises(Error, match="already exists with 13 bytes"):
        dl.download("q2-imatrix", directory=tmp_path, endpoint=hub.url, progress=False)
    assert (tmp_path / Q2).read_bytes() == b"not the model" and hub.cdn_gets() == []


DiskUsage = namedtuple("DiskUsage", "total used free")


def fake_free_space(monkeypatch, free):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(1 << 40, 0, free))


def test_too_little_disk_space_is_refused_before_any_byte(hub, tmp_path, monkeypatch):
    fake_free_space(monkeypatch, SIZE - 1)
    target = tmp_path / "not-yet-created"
    with pytest.raises(Error) as err:
        dl.download("q2-imatrix", directory=target, endpoint=hub.url, progress=False)
    msg = str(err.value)
    assert "not enough disk space" in msg and "\n" not in msg
    assert dl.human(SIZE) in msg and dl.human(SIZE - 1) in msg
    assert not target.exists() and hub.cdn_gets() == []


def test_the_space_check_counts_the_partial_file_already_present(hub, payload, tmp_path,
                                                                 monkeypatch):
    kept = 2_000_000
    part = tmp_path / (Q2 + ".part")
    part.write_bytes(payload[:kept])
    fake_free_space(monkeypatch, SIZE - kept - 1)
    with pytest.raises(Error, match="not enough disk space") as err:
        dl.download("q2-imatrix", directory=tmp_path, endpoint=hub.url, progress=False)
    assert dl.human(SIZE - kept) in str(err.value) and dl.human(kept) in str(err.value)
    assert part.stat().st_size == kept and hub.cdn_gets() == []

    fake_free_space(monkeypatch, SIZE - kept)  # exactly the rest: enough
    result = dl.download("q2-imatrix", directory=tmp_path, endpoint=hub.url, progress=False)
    assert (result.fetched, result.resumed_from) == (SIZE - kept, kept)
    assert (tmp_path / Q2).read_bytes() == payload

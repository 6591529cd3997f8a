"""ds4 serve on the real engine (tiny generated model) and as a command."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

import ds4
from conftest import default_sigint, subprocess_env
from ds4.server import ModelEngine, Server, ServerThread


@pytest.fixture(scope="module")
def real(tiny_q2):
    model = ds4.load(tiny_q2, ctx=1024)
    st = ServerThread(Server(ModelEngine(model))).start()
    yield st
    st.stop()


def test_openai_sdk_two_turns_on_the_real_engine_reuse_the_kv_state(real):
    import openai
    client = openai.OpenAI(base_url=real.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Say something."}]
    r1 = client.chat.completions.create(model="deepseek-v4-flash", messages=messages,
                                        max_tokens=6, temperature=0,
                                        extra_body={"thinking": {"type": "disabled"}})
    assert r1.choices[0].finish_reason in ("stop", "length")
    assert 0 < r1.usage.completion_tokens <= 6
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "More."}]
    r2 = client.chat.completions.create(model="deepseek-v4-flash", messages=messages,
                                        max_tokens=4, temperature=0,
                                        extra_body={"thinking": {"type": "disabled"}})
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens


def test_anthropic_sdk_stream_on_the_real_engine(real):
    import anthropic
    client = anthropic.Anthropic(base_url=real.url, api_key="x", max_retries=0)
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=5,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port):
    """Local addresses of listening TCP sockets on `port` (from /proc/net/tcp)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":
                    out.append(addr)
    return out


def test_serve_command_binds_loopback_by_default_and_stops_on_sigint(tiny_q2, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ds4.cli", "serve", "-m", str(tiny_q2),
                             "--port", str(port), "--ctx", "512"], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < end, "server did not come up"
            time.sleep(0.2)
        assert listening_addresses(port) == ["0100007F"]        # 127.0.0.1 only
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                          json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_kv_disk_dir_that_cannot_be_made_is_a_one_line_error(tiny_q2, tmp_path):
    (tmp_path / "kv").write_text("a file where a directory would go")
    r = subprocess.run([sys.executable, "-m", "ds4.cli", "serve", "-m", str(tiny_q2),
                        "--kv-disk-dir", str(tmp_path / "kv" / "cache"), "--port", str(free_port())],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("ds4: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_on_a_port_in_use_fails_at_once_before_loading_the_model(tmp_path):
    """The port is taken before the model loads (minutes for Flash on a GPU):
    with the port in use, even a model path that does not exist is never
    reached; the error is one line naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ds4.cli", "serve", "-m", str(tmp_path / "absent.gguf"),
                            "--port", str(port)], capture_output=True, text=True, env=subprocess_env(),
                           timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"ds4: cannot listen on 127.0.0.1:{port}: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "absent.gguf" not in r.stderr


def test_listen_sockets_put_every_address_of_a_host_on_one_port(monkeypatch):
    """`--port 0` on a host of several addresses (localhost where it resolves
    to 127.0.0.1 and ::1; here made to, since this machine's may not) binds
    them all to the one ephemeral port that `ds4 serve` then prints."""
    from ds4.server import listen_sockets
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kw: both)
    socks = listen_sockets("localhost", 0)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(socks) == 2 and len(ports) == 1 and ports != {0}
    finally:
        for s in socks:
            s.close()


def test_serve_with_a_trace_file_it_cannot_open_fails_before_loading_the_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ds4.cli", "serve", "-m", str(tmp_path / "absent.gguf"),
                        "--trace", str(tmp_path / "no" / "such" / "dir" / "trace.log"),
                        "--port", str(free_port())], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("ds4: cannot open the trace file ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "absent.gguf" not in r.stderr

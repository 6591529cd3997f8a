"""`ds4 info` as a user runs it."""
import re
import subprocess
import sys
import tempfile

from conftest import subprocess_env


def ds4(*args):
    with tempfile.TemporaryDirectory() as cwd:   # not the checkout: its ds4/ is unbuilt
        return subprocess.run([sys.executable, "-m", "ds4.cli", *args], capture_output=True,
                              text=True, timeout=120, cwd=cwd, env=subprocess_env())


def test_info_prints_shape_census_and_memory(tiny_q2):
    r = ds4("info", str(tiny_q2), "--ctx", "1048576")
    assert r.returncode == 0, r.stderr
    assert "custom shape: block_count=6" in r.stdout
    assert "q2 routed experts" in r.stdout
    assert "IQ2_XXS" in r.stdout and "Q8_0" in r.stdout
    assert "memory at ctx 1048576" in r.stdout
    kv = re.search(r"KV ([\d.]+) GiB \(float32; ([\d.]+) GiB compact", r.stdout)
    assert kv and float(kv.group(2)) < float(kv.group(1))


def test_info_on_a_truncated_file_is_one_line_and_exit_1(tiny_q2, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_q2.read_bytes()[:1000])
    r = ds4("info", str(bad))
    assert r.returncode == 1
    assert r.stderr.startswith("ds4: ") and "truncated GGUF" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_info_on_a_missing_file_is_one_line_and_exit_1(tmp_path):
    r = ds4("info", str(tmp_path / "absent.gguf"))
    assert r.returncode == 1 and "no such model file" in r.stderr and "Traceback" not in r.stderr


def test_python_dash_m_ds4_is_the_ds4_command():
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([sys.executable, "-m", "ds4", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=cwd, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: ds4 ")
    for command in ("run", "chat", "serve", "download", "bench", "info"):
        assert f"  {command} " in r.stdout

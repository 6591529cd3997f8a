"""`ds4 run` and `ds4 chat` as a user types them (subprocesses, and a pty for the REPL)."""
import re
import subprocess
import sys
import tempfile
import time

import pexpect
import pytest

import ds4
from conftest import default_sigint, subprocess_env


def ds4_cli(*args, stdin=None):
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "ds4.cli", *args], input=stdin,
                              capture_output=True, text=True, timeout=300, cwd=cwd,
                              env=subprocess_env())


def test_greedy_run_is_deterministic(tiny_q2):
    a = ds4_cli("run", "-m", str(tiny_q2), "--temp", "0", "-n", "12", "--nothink", "hi there")
    b = ds4_cli("run", "-m", str(tiny_q2), "--temp", "0", "-n", "12", "--nothink", "hi there")
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip() and a.stdout == b.stdout


def test_seeded_sampling_repeats_and_seeds_differ(tiny_q2):
    args = ("run", "-m", str(tiny_q2), "--temp", "1", "--min-p", "0", "-n", "12", "--nothink")
    a = ds4_cli(*args, "--seed", "5", "hello")
    b = ds4_cli(*args, "--seed", "5", "hello")
    c = ds4_cli(*args, "--seed", "6", "hello")
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_prompt_from_file_and_stdin_equal_the_argument(tiny_q2, tmp_path):
    (tmp_path / "p.txt").write_text("tell me something")
    base = ("run", "-m", str(tiny_q2), "--temp", "0", "-n", "8", "--nothink")
    arg = ds4_cli(*base, "tell me something")
    assert ds4_cli(*base, "--prompt-file", str(tmp_path / "p.txt")).stdout == arg.stdout
    assert ds4_cli(*base, stdin="tell me something").stdout == arg.stdout


def test_thinking_goes_to_stderr_and_timing_is_reported(tiny_q2):
    r = ds4_cli("run", "-m", str(tiny_q2), "--temp", "0", "-n", "6", "hi")
    assert r.returncode == 0
    assert re.search(r"ds4: prefill: \d+ tokens, [\d.]+ t/s, generation: 6 tokens", r.stderr)


def test_truncated_and_missing_models_are_one_line_errors(tiny_q2, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_q2.read_bytes()[:5000])
    for path in (cut, tmp_path / "absent.gguf"):
        r = ds4_cli("run", "-m", str(path), "hi")
        assert r.returncode == 1
        assert r.stderr.startswith("ds4: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_bad_usage_exits_2(tiny_q2, tmp_path):
    (tmp_path / "p.txt").write_text("x")
    r = ds4_cli("run", "-m", str(tiny_q2), "--prompt-file", str(tmp_path / "p.txt"), "also")
    assert r.returncode == 2


def expected_turn_tokens(model_path, text, previous_answer_closed=True):
    """New tokens of a REPL turn: EOS closing the last answer, then
    <｜User｜> + text + <｜Assistant｜> + <think>, counted with the real tokenizer."""
    from tokenizers import Tokenizer
    from ds4.tokenizer import reference_tokenizer_json_path
    real = Tokenizer.from_file(reference_tokenizer_json_path())
    return int(previous_answer_closed) + 3 + len(real.encode(text, add_special_tokens=False).ids)


def test_chat_second_turn_prefills_only_its_new_tokens(tiny_q2, tmp_path):
    env = subprocess_env()
    env["HOME"] = str(tmp_path)   # the history file goes here
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    child = pexpect.spawn(sys.executable, ["-m", "ds4.cli", "chat", "-m", str(tiny_q2), "--temp",
                                           "0", "-n", "6"], cwd=str(tmp_path), env=env,
                          encoding="utf-8", timeout=120)
    try:
        child.expect("ds4>")
        child.sendline("hello there")
        child.expect(r"prefill: (\d+) tokens")
        first = int(child.match.group(1))
        child.expect("ds4>")
        child.sendline("and now a second question")
        child.expect(r"prefill: (\d+) tokens")
        second = int(child.match.group(1))
        child.expect("ds4>")
        child.sendline("/help")
        child.expect("/think-max")
        child.sendline("/bogus")
        child.expect("unknown command")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert first > second
    assert second == expected_turn_tokens(tiny_q2, "and now a second question")


def test_chat_ctrl_d_quits(tiny_q2, tmp_path):
    env = subprocess_env()
    env["HOME"] = str(tmp_path)
    child = pexpect.spawn(sys.executable, ["-m", "ds4.cli", "chat", "-m", str(tiny_q2)],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120)
    child.expect("ds4>")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert child.wait() == 0


def test_python_generate_reuses_the_live_prefix(tiny_q2):
    with ds4.load(tiny_q2) as m:
        first = m.generate("hello", max_tokens=5, temperature=0, think="none")
        again = m.generate("hello", max_tokens=5, temperature=0, think="none")
        assert first.tokens == again.tokens
        assert first.prefilled_tokens == first.prompt_tokens
        assert again.prefilled_tokens == 1    # only the last prompt token, for its logits
        pieces = list(m.generate("hello", max_tokens=5, temperature=0, think="none", stream=True))
        assert "".join(pieces) == first.text and all(p.kind == "answer" for p in pieces)


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(tiny_q2, tmp_path):
    env = subprocess_env()
    env["HOME"] = str(tmp_path)
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    child = pexpect.spawn(sys.executable, ["-m", "ds4.cli", "chat", "-m", str(tiny_q2), "--temp",
                                           "0", "--nothink", "-n", "100000"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120,
                          preexec_fn=default_sigint,
                          # a Ctrl+C landing inside a write leaves half a character on the
                          # terminal (the random model's text is full of multi-byte ones)
                          codec_errors="replace")
    try:
        child.expect("ds4>")
        child.sendline("write forever")
        time.sleep(4)                  # well into the (100,000-token) reply
        child.sendintr()
        child.expect(r"generation: (\d+) tokens.*\(stopped\)")
        assert int(child.match.group(1)) > 0
        child.expect("ds4: stopped")
        child.expect("ds4>")
        # the partial answer stays in the transcript, closed by EOS: only the new turn is prefilled
        child.sendline("short")
        time.sleep(2)
        child.sendintr()
        child.expect(r"prefill: (\d+) tokens")
        second = int(child.match.group(1))
        child.expect("ds4>")
        child.sendline("/ctx 4096")
        child.expect(r"KV state up to [\d.]+ GiB")
        child.expect("ds4>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        assert child.wait() == 0
    finally:
        child.close(force=True)
    assert second == expected_turn_tokens(tiny_q2, "short")


def test_warm_weights_run_answers_the_same(tiny_q2):
    base = ("run", "-m", str(tiny_q2), "--temp", "0", "-n", "6", "--nothink", "hi")
    warm = ds4_cli(*base[:1], "--warm-weights", *base[1:])
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == ds4_cli(*base).stdout


def test_numerics_option_reaches_the_model(tiny_q2):
    answers = {}
    for numerics in ("exact", "qat", "qat-q8"):
        cli = ds4_cli("run", "-m", str(tiny_q2), "--numerics", numerics, "--temp", "0", "-n", "8",
                      "--nothink", "--system", "", "hi")
        assert cli.returncode == 0, cli.stderr
        with ds4.load(tiny_q2, numerics=numerics) as m:
            answers[numerics] = m.generate("hi", max_tokens=8, temperature=0, think="none").text
        assert cli.stdout.strip() == answers[numerics].strip()
    # on this model neither mode answers as the default (qat) does, so the equalities
    # above show the option was applied
    assert answers["exact"] != answers["qat"] and answers["qat-q8"] != answers["qat"]
    bad = ds4_cli("run", "-m", str(tiny_q2), "--numerics", "fp4", "hi")
    assert bad.returncode == 2 and "fp4" in bad.stderr

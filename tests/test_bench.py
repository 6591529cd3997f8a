"""`ds4 bench`: the frontier walk, its CSV, greedy decode, plot, synthetic files, errors."""
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

import ds4
from ds4 import bench
from ds4.testing import ModelConfig, tensor_plan
from conftest import subprocess_env


def ds4_cli(*args):
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "ds4.cli", *args], capture_output=True,
                              text=True, timeout=300, cwd=cwd, env=subprocess_env())


@pytest.fixture(scope="module")
def tiny(tiny_q2):
    with ds4.load(tiny_q2, backend="cpu", ctx=512) as m:
        yield m


def test_frontiers_step_from_start_and_end_exactly_at_max():
    assert bench.frontiers(2048, 8192, 2048) == [2048, 4096, 6144, 8192]
    assert bench.frontiers(100, 350, 100) == [100, 200, 300, 350]
    assert bench.frontiers(64, 64, 1000) == [64]


def test_csv_rows_walk_the_frontiers_and_prefill_adds_up_to_ctx_max(tiny_q2, tmp_path):
    out = tmp_path / "b.csv"
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-start", "40", "--ctx-max", "100",
                "--step-incr", "25", "--gen-tokens", "3", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(bench.CSV_COLUMNS)
    assert [int(x["ctx_tokens"]) for x in rows] == [40, 65, 90, 100]
    assert [int(x["prefill_tokens"]) for x in rows] == [40, 25, 25, 10]
    assert sum(int(x["prefill_tokens"]) for x in rows) == 100
    assert all(int(x["gen_tokens"]) == 3 for x in rows)
    assert all(float(x["prefill_tps"]) > 0 and float(x["gen_tps"]) > 0 for x in rows)
    kv = [int(x["kvcache_bytes"]) for x in rows]
    assert all(a < b for a, b in zip(kv, kv[1:]))
    # the table on stdout carries the same rows
    table = [line.split() for line in r.stdout.strip().splitlines()]
    assert table[0] == list(bench.CSV_COLUMNS)
    assert [int(t[0]) for t in table[1:]] == [40, 65, 90, 100]


def test_kvcache_bytes_is_the_session_state_at_the_frontier(tiny):
    ids = bench.bench_tokens(tiny.tokenizer, 60)
    rows = list(bench.walk(tiny, ctx_start=30, ctx_max=60, step_incr=30, gen_tokens=2))
    s = tiny.session(64)
    s.eval(ids[:30])
    assert rows[0].kvcache_bytes == s.kv_bytes
    s.eval(ids[30:60])
    assert rows[1].kvcache_bytes == s.kv_bytes


def test_csv_on_stdout_with_dash_and_a_short_walk_starts_at_ctx_max(tiny_q2):
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-max", "32", "--gen-tokens", "2",
                "--csv", "-")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == list(bench.CSV_COLUMNS) and [row[0] for row in rows[1:]] == ["32"]


def test_temperature_decodes_the_default_samplers_draws_from_the_cli(tiny_q2):
    """`ds4 bench --temperature 1` decodes min-p 0.05 draws (seed 1): a row
    for the frontier, and a negative temperature is a usage error."""
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-max", "32", "--gen-tokens", "3", "--temperature", "1",
                "--csv", "-")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert [row[0] for row in rows[1:]] == ["32"] and rows[1][3] == "3"
    bad = ds4_cli("bench", "-m", str(tiny_q2), "--temperature", "-1")
    assert bad.returncode == 2 and "temperature" in bad.stderr


@pytest.mark.parametrize("host_steps", [False, True], ids=["backend-steps", "host-steps"])
def test_decode_is_greedy_without_eos_and_repeats(tiny, host_steps, monkeypatch):
    monkeypatch.setattr(bench, "DECODE_PIECE", 3)   # pieces end inside the decode
    a = list(bench.walk(tiny, ctx_start=20, ctx_max=40, step_incr=20, gen_tokens=5, host_steps=host_steps))
    b = list(bench.walk(tiny, ctx_start=20, ctx_max=40, step_incr=20, gen_tokens=5, host_steps=host_steps))
    assert [r.generated for r in a] == [r.generated for r in b]
    # each decoded token is the argmax (EOS excluded) after the frontier and the tokens before
    ids = bench.bench_tokens(tiny.tokenizer, 40)
    eos = tiny.tokenizer.eos_id
    for row in a:
        s = tiny.session(64)
        logits = s.eval(ids[:row.ctx_tokens])
        for tok in row.generated:
            logits[eos] = -np.inf
            assert tok == int(np.argmax(logits))
            logits = s.eval([tok])


@pytest.mark.parametrize("host_steps", [False, True], ids=["backend-steps", "host-steps"])
def test_a_sampled_decode_is_the_samplers_draws(tiny, host_steps, monkeypatch):
    """`ds4 bench --temperature`: each decoded token is the sampler's draw from
    eval's logits after the tokens before (EOS drawn like any other), by
    decode_sampled or, with host steps, by the host a token."""
    from ds4.sampling import Sampler
    monkeypatch.setattr(bench, "DECODE_PIECE", 3)
    rows = list(bench.walk(tiny, ctx_start=20, ctx_max=40, step_incr=20, gen_tokens=5, host_steps=host_steps,
                           sampler=Sampler(temperature=1.5, min_p=0.01, seed=4)))
    ids = bench.bench_tokens(tiny.tokenizer, 40)
    sampler = Sampler(temperature=1.5, min_p=0.01, seed=4)
    s = tiny.session(64)
    for row in rows:
        s.rewind(0)
        logits = s.eval(ids[:row.ctx_tokens])
        for tok in row.generated:
            assert tok == sampler.sample(logits)
            logits = s.eval([tok])


def test_walk_after_rewind_matches_a_fresh_prefill(tiny):
    """The rewind between frontiers leaves the state of feeding the prefix only,
    so the second frontier decodes what a fresh session fed the same prefix does."""
    rows = list(bench.walk(tiny, ctx_start=10, ctx_max=30, step_incr=20, gen_tokens=4))
    fresh = list(bench.walk(tiny, ctx_start=30, ctx_max=30, step_incr=1, gen_tokens=4))
    assert rows[-1].generated == fresh[0].generated


@pytest.mark.parametrize("host_steps", [False, True], ids=["backend-steps", "host-steps"])
def test_a_backends_one_time_setup_is_not_timed(tiny, host_steps, monkeypatch):
    """A session's first chunk longer than any before (evals are cut into
    chunks of prefill_chunk) pays a set-up (CUDA sizes its buffers) that also
    undoes the one-token set-ups (the decode and greedy graphs, which point
    into them), paid by the next one-token eval or greedy step; the walk does
    both untimed before the first frontier, so the first row's rates are
    those of the steps alone. A fake clock: 2 s for a buffer growth, 1 s for a
    graph capture, 1 ms a token otherwise."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    class Session:
        prefill_chunk = 16
        kv_bytes = 0

        capacity, captured, greedy_captured = 0, False, False

        def eval(self, ids):
            chunk = min(len(ids), self.prefill_chunk)
            if chunk > self.capacity:
                self.capacity, self.captured, self.greedy_captured = chunk, False, False
                clock[0] += 2.0
            if len(ids) == 1 and not self.captured:
                self.captured = True
                clock[0] += 1.0
            clock[0] += 1e-3 * len(ids)
            return np.zeros(tiny.config.n_vocab, dtype=np.float32)

        def decode_greedy(self, first, n, except_id=None):
            if not self.greedy_captured:
                self.greedy_captured = True
                clock[0] += 1.0
            clock[0] += 1e-3 * n
            return [0] * n

        def rewind(self, n):
            pass

    model = types.SimpleNamespace(tokenizer=tiny.tokenizer, session=lambda ctx: Session())
    rows = list(bench.walk(model, ctx_start=20, ctx_max=40, step_incr=20, gen_tokens=5,
                           host_steps=host_steps))
    assert [round(r.gen_tps) for r in rows] == [1000, 1000]
    assert [round(r.prefill_tps) for r in rows] == [1000, 1000]


def test_short_text_is_repeated_to_reach_the_frontier(tiny):
    ids = bench.bench_tokens(tiny.tokenizer, 50, text="one two three")
    once = tiny.tokenizer.encode("one two three\n\n")
    assert len(ids) == 50 and ids[:len(once)] == once and ids[len(once):2 * len(once)] == once


def test_prompt_file_is_the_walked_text(tiny_q2, tmp_path):
    (tmp_path / "p.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    r = ds4_cli("bench", "-m", str(tiny_q2), "--prompt-file", str(tmp_path / "p.txt"),
                "--ctx-start", "30", "--ctx-max", "30", "--gen-tokens", "1", "--csv", "-")
    assert r.returncode == 0, r.stderr
    (tmp_path / "e.txt").write_text("")
    r = ds4_cli("bench", "-m", str(tiny_q2), "--prompt-file", str(tmp_path / "e.txt"),
                "--ctx-start", "30", "--ctx-max", "30", "--gen-tokens", "1")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        "ds4: the benchmark text has no tokens"


def test_shipped_text_covers_the_default_walk(tiny):
    assert len(tiny.tokenizer.encode(bench.default_text())) >= bench.CTX_MAX


def test_plot_is_a_png(tiny_q2, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-start", "16", "--ctx-max", "48",
                "--step-incr", "16", "--gen-tokens", "2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_plot_is_one_line(tiny_q2, tmp_path):
    pytest.importorskip("matplotlib")
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-max", "8", "--gen-tokens", "1",
                "--plot", str(tmp_path / "no" / "b.png"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ds4: cannot write ")


def test_plot_without_matplotlib_is_one_line(tiny_q2, tmp_path):
    # a module named matplotlib that fails to import stands in for a missing one
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('absent')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    r = subprocess.run([sys.executable, "-m", "ds4.cli", "bench", "-m", str(tiny_q2),
                        "--ctx-start", "8", "--ctx-max", "8", "--plot", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "ds4: --plot needs matplotlib (pip install 'matplotlib>=3.8')"]


def test_decode_bytes_counts_dense_tensors_a_share_of_experts_and_one_table_row(tiny):
    c = tiny.config
    plan = tensor_plan(ModelConfig.tiny(), "q2")
    dense = sum(t.nbytes for t in plan if "_exps." not in t.name
                and t.name != "token_embd.weight" and "tid2eid" not in t.name)
    routed = sum(t.nbytes for t in plan if "_exps." in t.name)
    rows = sum(t.nbytes // t.ne[-1] for t in plan
               if t.name == "token_embd.weight" or "tid2eid" in t.name)
    db = bench.decode_bytes(tiny)
    assert (db.dense, db.routed, db.table_rows) == (dense, routed, rows)
    assert db.per_token == int(dense + routed * c.n_expert_used / c.n_expert + rows)


def test_flash_q2_reads_about_9_56_gb_per_decoded_token(tmp_path):
    """The peer figure (antirez/ds4: 9.56 GB/token for q2), from the generator's
    full-size layout, read back through ds4.load on a sparse file."""
    path = bench.write_synthetic(tmp_path, "q2")
    with ds4.load(path, backend="cpu", ctx=16, synthetic=True) as m:
        db = bench.decode_bytes(m)
    assert round(db.per_token / 1e9, 2) == 9.56


def test_batch_report_relates_decode_rate_to_the_copy_bound():
    db = bench.DecodeBytes(dense=6_000, routed=8_000, routed_share=0.25, table_rows=0,
                           active_weights=1_000)
    row = bench.Row(128, 128, 1000.0, 8, 50.0, 1)
    lines = bench.batch_report([row], db, bandwidth=1e6)   # bound: 1e6 / 8000 = 125 tok/s
    assert "decode bound 125 tok/s" in lines[1]
    assert "40.0% of bound" in lines[2]


def test_batch_report_shows_where_the_mean_token_time_comes_from():
    db = bench.DecodeBytes(dense=6_000, routed=8_000, routed_share=0.25, table_rows=0,
                           active_weights=1_000)
    times = [0.007, 0.007, 0.007, 0.008] * 3   # every fourth token slower, as on CUDA
    row = bench.Row(128, 128, 1000.0, len(times), 50.0, 1, gen_times=times)
    line = bench.batch_report([row], db, bandwidth=1e6)[3]
    ms = [1e3 * t for t in times]
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1]
    assert (f"median {statistics.median(ms):.3f}, mean {statistics.mean(ms):.3f}, "
            f"p90 {p90:.3f}, max {max(ms):.3f} (token 3)") in line


def test_walk_times_each_decoded_token(tiny):
    rows = list(bench.walk(tiny, ctx_start=20, ctx_max=40, step_incr=20, gen_tokens=5))
    for r in rows:
        assert len(r.gen_times) == r.gen_tokens and min(r.gen_times) > 0
        # the tokens' times add up to the decode the rate was measured over
        assert sum(r.gen_times) <= r.gen_tokens / r.gen_tps * 1.0001


def test_a_backend_without_a_bandwidth_probe_is_refused_by_name():
    with pytest.raises(ds4.Error, match="no copy-bandwidth probe for the metal backend"):
        bench.bandwidth_probe(types.SimpleNamespace(backend="metal"))


def test_cpu_copy_bandwidth_is_a_positive_rate():
    assert bench.cpu_copy_bandwidth(nbytes=1 << 20, repeats=2) > 0


def test_synthetic_file_is_sparse_and_benchmarks_on_cpu(tmp_path):
    cfg = ModelConfig.tiny()
    path = bench.write_synthetic(tmp_path, "q4", cfg)
    st = os.stat(path)
    assert st.st_blocks * 512 < st.st_size // 4          # the data section is a hole
    with ds4.load(path, backend="cpu", ctx=64, synthetic=True) as m:
        assert m.synthetic and m.config.n_layer == cfg.n_layer
        rows = list(bench.walk(m, ctx_start=8, ctx_max=16, step_incr=8, gen_tokens=2))
    assert [r.ctx_tokens for r in rows] == [8, 16]


@pytest.mark.parametrize("args, message", [
    (["--ctx-start", "200", "--ctx-max", "100"],
     "--ctx-start (200) must not exceed --ctx-max (100)"),
    (["--ctx-max", "100", "--gen-tokens", "8", "--ctx", "50"], "--ctx 50 is too small"),
    (["--gen-tokens", "0"], "Invalid value for '--gen-tokens'"),
    (["--step-incr", "x"], "Invalid value for '--step-incr'"),
    (["--synthetic", "q3"], "Invalid value for '--synthetic'"),
    (["--synthetic", "q2"], "give -m MODEL or --synthetic, not both"),
    (["--bogus"], "No such option '--bogus'"),
])
def test_bad_options_are_one_line_usage_errors(tiny_q2, args, message):
    r = ds4_cli("bench", "-m", str(tiny_q2), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds4: bench: ") and message in lines[0]


def test_missing_model_and_unwritable_csv_are_one_line_errors(tiny_q2, tmp_path):
    r = ds4_cli("bench", "-m", str(tmp_path / "absent.gguf"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("ds4: ") and "absent.gguf" in r.stderr
    r = ds4_cli("bench", "-m", str(tiny_q2), "--ctx-start", "8", "--ctx-max", "8",
                "--csv", str(tmp_path / "no" / "dir.csv"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ds4: cannot write ")

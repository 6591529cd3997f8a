"""Throughput benchmark: prefill and greedy decode speed at growing context frontiers.

The walk follows antirez/ds4's ds4-bench so the CSVs compare: one fixed token
sequence is fed up to frontiers ctx_start, ctx_start + step, ..., ctx_max (the last
one clamped to ctx_max). At each frontier only the newest interval is prefilled and
timed, then exactly `gen_tokens` greedy tokens are decoded (EOS excluded, so every
row decodes the same amount) and timed, then the session is rewound to the frontier
(outside both timings) before the walk goes on. Before the first frontier the
backend's own chunk (the longest a forward call takes; shorter if no interval of the
walk is that long), then one token, are evaluated and rewound, untimed, so a
backend's one-time set-up (CUDA sizes its chunk buffers to the chunk, then captures
its decode graph, ~12 ms on an H200, again whenever the buffers grow) is charged to
neither the first row's prefill nor its decode.

The decode is Session.decode_greedy in pieces of DECODE_PIECE tokens (the choice
after each token made by the backend: on CUDA on the GPU, the host reading the
choices once a piece), what greedy generation runs; host_steps=True decodes by eval
and the host's argmax a token instead, with each token's own time. With a sampler
(`ds4 bench --temperature`) the tokens are its draws instead: by decode_sampled
(CUDA draws a min-p sampler's on the GPU), or with host_steps by eval and the
host's draw a token.

Everything goes through the public API (ds4.load, Session.eval/decode_greedy/
decode_sampled/rewind/kv_bytes), so it measures any backend.
"""
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .errors import Error
from .generation import prefill_step
from .model import copy_bandwidth as backend_copy_bandwidth

CSV_COLUMNS = ("ctx_tokens", "prefill_tokens", "prefill_tps", "gen_tokens", "gen_tps",
               "kvcache_bytes")
ROUTED_EXPERTS = re.compile(r"\.ffn_(gate|up|down)_exps\.")
# Token-indexed tables: a token reads one row of each, not the whole tensor.
LOOKUP_TABLES = re.compile(r"^token_embd\.|_tid2eid\.")
# Walk defaults, as in ds4-bench.
CTX_START, CTX_MAX, STEP_INCR, GEN_TOKENS = 2048, 32768, 2048, 128
# greedy tokens a decode_greedy call: the progress report's step, and the tokens
# whose time is one mean in gen_times
DECODE_PIECE = 16


@dataclass
class Row:
    ctx_tokens: int        # the frontier: tokens in the session before decoding
    prefill_tokens: int    # tokens prefilled to reach it from the previous frontier
    prefill_tps: float
    gen_tokens: int
    gen_tps: float
    kvcache_bytes: int     # Session.kv_bytes at the frontier
    generated: list = field(default_factory=list, repr=False)   # the decoded ids
    # each decoded token's seconds (together the decode's time): with host_steps
    # its own argmax and eval (and the progress report before them), a mean above
    # the median showing tokens that cost more than the rest (on CUDA every
    # fourth, which completes the ratio-4 layers' compression windows); else
    # its piece's mean
    gen_times: list = field(default_factory=list, repr=False)

    def csv(self):
        return (f"{self.ctx_tokens},{self.prefill_tokens},{self.prefill_tps:.2f},"
                f"{self.gen_tokens},{self.gen_tps:.2f},{self.kvcache_bytes}")


def frontiers(ctx_start=CTX_START, ctx_max=CTX_MAX, step_incr=STEP_INCR):
    """ctx_start, ctx_start + step_incr, ..., always ending exactly at ctx_max."""
    for name, v in (("ctx-start", ctx_start), ("ctx-max", ctx_max), ("step-incr", step_incr)):
        if v <= 0:
            raise Error(f"--{name} must be positive, got {v}")
    if ctx_start > ctx_max:
        raise Error(f"--ctx-start ({ctx_start}) must not exceed --ctx-max ({ctx_max})")
    return list(range(ctx_start, ctx_max, step_incr)) + [ctx_max]


def session_ctx(ctx, ctx_max, gen_tokens):
    """The session context: ctx, or just enough for the walk when None."""
    if gen_tokens <= 0:
        raise Error(f"--gen-tokens must be positive, got {gen_tokens}")
    if ctx is None:
        return ctx_max + gen_tokens
    if ctx < ctx_max + gen_tokens:
        raise Error(f"--ctx {ctx} is too small: the walk needs ctx-max + gen-tokens = "
                    f"{ctx_max + gen_tokens}")
    return ctx


def default_text():
    """The shipped benchmark text: Pride and Prejudice, chapters 1-30 (public domain)."""
    return resources.files("ds4").joinpath("data/bench.txt").read_text(encoding="utf-8")


def bench_tokens(tokenizer, n, text=None):
    """The first n ids of the text as plain BPE, the text repeated as often as needed."""
    text = default_text() if text is None else text
    ids = tokenizer.encode(text, special=False)
    if not ids:
        raise Error("the benchmark text has no tokens")
    reps = -(-n // len(ids))
    if reps > 1:
        ids = tokenizer.encode(text.rstrip() + "\n\n", special=False) * reps
    return ids[:n]


def walk(model, *, ctx_start=CTX_START, ctx_max=CTX_MAX, step_incr=STEP_INCR,
         gen_tokens=GEN_TOKENS, ctx=None, text=None, progress=None, host_steps=False, sampler=None):
    """Yields one Row per frontier. progress(frontier, stage, done, total) is called
    before the prefill and as prefill chunks and decoded tokens complete (stage
    "prefill" or "decode"). sampler: a Sampler (temperature > 0) whose draws are
    decoded instead of greedy choices (Session.decode_sampled, or with host_steps
    eval and Sampler.sample a token), the end-of-text id drawn like any other."""
    points = frontiers(ctx_start, ctx_max, step_incr)
    ctx = session_ctx(ctx, ctx_max, gen_tokens)
    ids = bench_tokens(model.tokenizer, ctx_max, text)
    eos = model.tokenizer.eos_id

    def choose(logits):   # a frontier's first token, and each token of the host's steps
        if sampler is not None:
            return sampler.sample(logits)
        logits[eos] = -np.inf
        return int(np.argmax(logits))

    session = model.session(ctx)
    # the warm-up (module docstring), rewound
    longest = max(b - a for a, b in zip([0] + points, points))
    session.eval(ids[:min(session.prefill_chunk, longest)])
    if host_steps:
        session.eval(ids[:1])
    elif sampler is not None:
        session.rewind(1)
        before = sampler.state   # (CUDA captures its sampled graph; the draw is not the walk's)
        session.decode_sampled(ids[1], 1, sampler)
        sampler.state = before
    else:
        session.rewind(1)
        session.decode_greedy(ids[1], 1, except_id=eos)   # (CUDA captures its greedy graph)
    session.rewind(0)
    previous = 0
    for frontier in points:
        todo = ids[previous:frontier]
        if progress:
            progress(frontier, "prefill", 0, len(todo))
        t0 = time.perf_counter()
        # the chunking `ds4 run` prefills with, so the numbers are what users get
        step = prefill_step(session)
        for start in range(0, len(todo), step):
            logits = session.eval(todo[start:start + step])
            if progress:
                progress(frontier, "prefill", min(start + step, len(todo)), len(todo))
        prefill_s = time.perf_counter() - t0
        kv = session.kv_bytes
        generated, gen_times = [], []
        t0 = t_prev = time.perf_counter()
        if host_steps:
            for i in range(gen_tokens):
                tok = choose(logits)
                generated.append(tok)
                logits = session.eval([tok])
                t_now = time.perf_counter()
                gen_times.append(t_now - t_prev)
                t_prev = t_now
                if progress:
                    progress(frontier, "decode", i + 1, gen_tokens)
        else:
            tok = choose(logits)
            while len(generated) < gen_tokens:
                k = min(DECODE_PIECE, gen_tokens - len(generated))
                if sampler is not None:
                    before = sampler.state
                    choices, states = session.decode_sampled(tok, k, sampler)
                    # the last draw is the next row's, not this one's: undone after the row
                    drawn_state = states[-2] if k > 1 else before
                else:
                    choices = session.decode_greedy(tok, k, except_id=eos)
                generated += [tok] + choices[:-1]
                tok = choices[-1]
                t_now = time.perf_counter()
                gen_times += [(t_now - t_prev) / k] * k
                t_prev = t_now
                if progress:
                    progress(frontier, "decode", len(generated), gen_tokens)
        gen_s = time.perf_counter() - t0
        if sampler is not None and not host_steps:
            sampler.state = drawn_state
        if frontier != points[-1]:
            session.rewind(frontier)
        yield Row(frontier, len(todo), len(todo) / max(prefill_s, 1e-9), gen_tokens,
                  gen_tokens / max(gen_s, 1e-9), kv, generated, gen_times)
        previous = frontier


# ---------------------------------------------------------------- bandwidth bound

@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes one decoded token reads, from the file's tensor directory."""
    dense: int           # every tensor but routed experts and lookup tables
    routed: int          # all routed-expert tensors
    routed_share: float  # n_expert_used / n_expert
    table_rows: int      # one row of each lookup table
    active_weights: int  # weight elements a token multiplies with (2 FLOP each)

    @property
    def per_token(self):
        return int(self.dense + self.routed * self.routed_share + self.table_rows)


def decode_bytes(model):
    dense = routed = rows = 0
    active = 0.0
    c = model.config
    share = c.n_expert_used / c.n_expert
    for t in model.gguf.tensors.values():
        n_el = int(np.prod(t.shape))
        if ROUTED_EXPERTS.search(t.name):
            routed += t.nbytes
            active += n_el * share
        elif LOOKUP_TABLES.search(t.name):
            rows += t.nbytes // t.shape[-1]
        else:
            dense += t.nbytes
            active += n_el
    return DecodeBytes(dense, routed, share, rows, int(active))


def cpu_copy_bandwidth(nbytes=1 << 30, repeats=4):
    """Bytes moved per second (read + write) by the best of a few numpy copies."""
    src = np.ones(nbytes, np.uint8)
    dst = np.ones(nbytes, np.uint8)   # touched, so no page faults inside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# One probe per backend.
COPY_BANDWIDTH = {"cpu": lambda model: cpu_copy_bandwidth(),
                  "cuda": lambda model: backend_copy_bandwidth(model)}


def bandwidth_probe(model):
    probe = COPY_BANDWIDTH.get(model.backend)
    if probe is None:
        raise Error(f"--batch-report: no copy-bandwidth probe for the {model.backend} backend")
    return probe


def copy_bandwidth(model):
    """The device's measured copy bandwidth in bytes/s (read + write)."""
    return bandwidth_probe(model)(model)


def batch_report(rows, db, bandwidth):
    """Lines comparing each row's decode traffic with the copy-bandwidth bound."""
    bound = bandwidth / db.per_token
    lines = [f"weights read per decoded token: {db.per_token / 1e9:.4g} GB "
             f"(dense {db.dense / 1e9:.4g} GB + {db.routed_share:.4g} of routed "
             f"{db.routed / 1e9:.4g} GB + {db.table_rows} B of table rows)",
             f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s -> decode bound "
             f"{bound:.3g} tok/s; prefill ~{2 * db.active_weights / 1e9:.3g} GFLOP/token "
             f"(2 per active weight)"]
    for r in rows:
        gbs = r.gen_tps * db.per_token / 1e9
        lines.append(f"ctx {r.ctx_tokens:>7}: decode {r.gen_tps:8.2f} tok/s = {gbs:7.2f} GB/s, "
                     f"{100 * r.gen_tps / bound:5.1f}% of bound; prefill "
                     f"{r.prefill_tps * 2 * db.active_weights / 1e9:8.1f} GFLOP/s")
        if r.gen_times:
            lines.append("             " + token_times(r.gen_times))
    return lines


def token_times(seconds):
    """A decode's per-token times in ms: where the mean comes from."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    return (f"token ms: median {np.median(ms):.3f}, mean {ms.mean():.3f}, "
            f"p90 {np.percentile(ms, 90):.3f}, max {ms.max():.3f} (token {int(ms.argmax())})")


# ---------------------------------------------------------------- synthetic model

def write_synthetic(directory, variant, config=None):
    """A sparse full-size (or `config`-size) generated GGUF in `directory`: the
    header and tensor directory only, the data a hole that reads as zeros."""
    from .testing import ModelConfig, write_model
    if variant not in ("q2", "q4"):
        raise Error(f"--synthetic must be q2 or q4, got {variant!r}")
    config = ModelConfig.flash() if config is None else config
    path = os.path.join(os.fspath(directory), f"synthetic-{variant}.gguf")
    try:
        write_model(path, config, variant=variant, sparse=True)
    except OSError as exc:
        raise Error(f"cannot write the synthetic model in {directory}: {exc.strerror}") from None
    return path


# ---------------------------------------------------------------- plot

def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise Error("--plot needs matplotlib (pip install 'matplotlib>=3.8')") from None
    matplotlib.use("Agg")


def plot(rows, path, title):
    """PNG: prefill and decode tok/s against context, on separate y axes."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    x = [r.ctx_tokens for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(x, [r.prefill_tps for r in rows], "o-", color="tab:blue", label="prefill")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("prefill tok/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(x, [r.gen_tps for r in rows], "s-", color="tab:red", label="decode")
    ax2.set_ylabel("decode tok/s", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise Error(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)

"""Prefill and decode speed of one backend on a model file.

    python csrc/cuda/bench.py MODEL [--backend cuda] [--ctx 4096] [--prompt 2048]
        [--decode 64] [--synthetic]

Decode is timed token by token after a prompt of --prompt tokens (the
context the decode steps attend over); each step returns its logits to the
host, as generation does."""
import argparse
import time

import numpy as np

import ds4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--numerics", default="qat")
    ap.add_argument("--synthetic", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    m = ds4.load(a.model, backend=a.backend, ctx=a.ctx, numerics=a.numerics, synthetic=a.synthetic)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.n_vocab, size=a.prompt + a.decode)
    s = m.session()
    s.eval(ids[:8])      # warm-up: buffers, first launches
    s.rewind(0)
    t = time.perf_counter()
    s.eval(ids[:a.prompt])
    prefill_s = time.perf_counter() - t
    steps = []
    for tok in ids[a.prompt:]:
        t = time.perf_counter()
        s.eval([tok])
        steps.append(time.perf_counter() - t)
    steps = np.array(steps[2:])
    print(f"{a.model}: backend {m.backend}, {m.config.n_layer} layers, load {load_s:.1f} s")
    print(f"prefill {a.prompt} tokens: {prefill_s:.2f} s = {a.prompt / prefill_s:.0f} tok/s")
    print(f"decode at {a.prompt} ctx: median {np.median(steps) * 1e3:.2f} ms/token = "
          f"{1 / np.median(steps):.1f} tok/s (min {steps.min() * 1e3:.2f} ms, "
          f"p90 {np.percentile(steps, 90) * 1e3:.2f} ms)")
    print("decode step ms, in order:", " ".join(f"{x * 1e3:.1f}" for x in steps))


if __name__ == "__main__":
    main()

"""One forward call under Nsight Compute: the profiled range is that call alone,
a decode step (default) or a prefill chunk (--chunk N, after a warm-up chunk).

    DS4_CUDA_NO_GRAPH=1 ncu --profile-from-start off ... python csrc/cuda/profile_step.py \\
        MODEL [--synthetic] [--prompt N] [--chunk N] [--numerics qat-q8]
    python csrc/cuda/profile_step.py --summarize ncu.csv   # time per kernel, largest first"""
import argparse
import collections
import csv
import ctypes
import re

import numpy as np

import ds4


def summarize(path, by_grid=False, top=25):
    """Total gpu__time_duration per kernel name (template arguments kept), or
    per name and launch shape (by_grid: tells same-kernel matrices apart)."""
    total, calls, dram = collections.Counter(), collections.Counter(), collections.Counter()
    with open(path) as f:
        rows = [r for r in csv.reader(line for line in f if line.startswith('"'))]
    head = rows[0]
    ik, im, iv = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    ig, ib = head.index("Grid Size"), head.index("Block Size")
    for r in rows[1:]:
        name = re.sub(r"\(.*", "", r[ik])
        if by_grid:
            name = f"{name} {r[ig]}x{r[ib]}"
        v = float(r[iv].replace(",", ""))
        if r[im] == "gpu__time_duration.sum":
            total[name] += v
            calls[name] += 1
        elif r[im].startswith("dram__bytes"):
            dram[name] += v
    unit = 1e-6   # ns -> ms
    all_ms = sum(total.values()) * unit
    w = 72 if by_grid else 48
    print(f"{'kernel':{w}s} {'calls':>6s} {'ms':>9s} {'share':>6s} {'GB/s':>7s}")
    for name, ns in total.most_common(top):
        gbs = dram[name] / ns if ns else 0
        print(f"{name[:w]:{w}s} {calls[name]:6d} {ns * unit:9.3f} {100 * ns * unit / all_ms:5.1f}% "
              f"{gbs:7.0f}")
    print(f"{'all':{w}s} {sum(calls.values()):6d} {all_ms:9.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=0, help="profile a prefill chunk of N tokens")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--numerics", default="qat", choices=["qat", "exact", "qat-q8"])
    ap.add_argument("--summarize", metavar="CSV")
    ap.add_argument("--by-grid", action="store_true", help="summarize per kernel and launch shape")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    if a.summarize:
        return summarize(a.summarize, a.by_grid, a.top)
    m = ds4.load(a.model, backend="cuda", ctx=a.prompt + a.chunk + 16, synthetic=a.synthetic,
                 numerics=a.numerics)
    s = m.session()
    ids = np.random.default_rng(0).integers(0, m.config.n_vocab, size=a.prompt + a.chunk + 3)
    s.eval(ids[:a.prompt])
    cuda = ctypes.CDLL("libcuda.so.1")
    if a.chunk:
        s.eval(ids[a.prompt:a.prompt + a.chunk])     # chunk buffers allocated
        s.rewind(a.prompt)
        cuda.cuProfilerStart()
        s.eval(ids[a.prompt:a.prompt + a.chunk])
        cuda.cuProfilerStop()
        return
    s.eval(ids[a.prompt:a.prompt + 1])
    s.eval(ids[a.prompt + 1:a.prompt + 2])
    cuda.cuProfilerStart()
    s.eval(ids[a.prompt + 2:a.prompt + 3])
    cuda.cuProfilerStop()


if __name__ == "__main__":
    main()

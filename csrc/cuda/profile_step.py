"""One forward call under Nsight Compute: the profiled range is that call alone,
a decode step (default) or a prefill chunk (--chunk N, after a warm-up chunk).

    DS4_CUDA_NO_GRAPH=1 ncu --profile-from-start off ... python csrc/cuda/profile_step.py \\
        MODEL [--synthetic] [--prompt N] [--chunk N] [--numerics qat-q8]
    python csrc/cuda/profile_step.py --summarize ncu.csv   # time per kernel, largest first
    python csrc/cuda/profile_step.py --streams ncu.csv [--scale k_act8=0 ...]   # the critical path"""
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


def read_kernels(path):
    """The profiled kernels in launch order: name (template arguments kept),
    stream and gpu__time_duration in us."""
    with open(path) as f:
        rows = [r for r in csv.reader(line for line in f if line.startswith('"'))]
    head = rows[0]
    ii, ik, istr = head.index("ID"), head.index("Kernel Name"), head.index("Stream")
    im, iu, iv = head.index("Metric Name"), head.index("Metric Unit"), head.index("Metric Value")
    kernels = {}
    for r in rows[1:]:
        k = kernels.setdefault(int(r[ii]), {"name": re.sub(r"\(.*", "", r[ik]), "stream": r[istr]})
        if r[im] == "gpu__time_duration.sum":
            scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r[iu]]
            k["us"] = float(r[iv].replace(",", "")) * scale
    return [kernels[i] for i in sorted(kernels)]


# Where a forward's streams meet (ds4_cuda.cu): a fork's first kernel waits
# for the main stream's last one; on the main stream, k_state waits for the kv
# stream (kv_join), k_hc_expand for the last Sinkhorn (hc_join), k_combine
# for the side stream (sh_join).
JOINS = {"k_state": "kv", "k_hc_expand": "sinkhorn", "k_combine": "side"}


def replay(kernels, scale=None):
    """The step's kernels on their streams, each as long as ncu measured it
    alone (times `scale[name]`; 0 drops it), no launch gaps: the step's
    length, each stream's busy time, and the time the main stream waits at
    each join. ncu's times are of kernels run alone, caches flushed, so the
    length overstates the wall time; the shape of the path is what it shows."""
    scale = scale or {}
    main = kernels[0]["stream"]
    side = next((k["stream"] for k in kernels if k["name"] == "k_hc_sinkhorn"), None)
    kv = next((k["stream"] for k in kernels if k["stream"] not in (main, side)), None)
    end, busy = collections.Counter(), collections.Counter()
    waits, wait_us = collections.Counter(), collections.Counter()
    last_sinkhorn, prev, step = 0.0, None, 0.0
    for k in kernels:
        f = next((v for n, v in scale.items() if n in k["name"]), 1.0)
        if f == 0:
            continue
        s, dur = k["stream"], k["us"] * f
        ready = end[s]
        if s != main and prev == main:
            ready = max(ready, end[main])
        if s == main and k["name"] in JOINS:
            dep = {"kv": end[kv], "sinkhorn": last_sinkhorn, "side": end[side]}[JOINS[k["name"]]]
            if dep > ready:
                waits[k["name"]] += 1
                wait_us[k["name"]] += dep - ready
                ready = dep
        end[s] = ready + dur
        busy[s] += dur
        if k["name"] == "k_hc_sinkhorn":
            last_sinkhorn = end[s]
        prev = s
        step = max(step, end[s])
    names = {main: "main", side: "side", kv: "kv"}
    return step, {names.get(s, s): v for s, v in busy.items()}, {n: (waits[n], wait_us[n]) for n in waits}


def report_streams(path, scales):
    kernels = read_kernels(path)
    step, busy, waits = replay(kernels)
    print(f"{len(kernels)} kernels, {sum(k['us'] for k in kernels) / 1e3:.2f} ms serialized; "
          f"replayed on their streams: {step / 1e3:.2f} ms")
    print("busy ms: " + ", ".join(f"{s} {v / 1e3:.2f}" for s, v in busy.items()))
    for n, (c, us) in waits.items():
        print(f"the main stream waits at {n}: {c} times, {us / 1e3:.3f} ms")
    if not waits:
        print("the main stream never waits at a join: it alone is the step")
    for item in scales:
        name, f = item.split("=")
        t = replay(kernels, {name: float(f)})[0]
        print(f"{name} x {float(f):g}: {t / 1e3:.2f} ms ({100 * (step - t) / step:+.1f}%)")


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
    ap.add_argument("--streams", metavar="CSV", help="replay the step's kernels on their streams")
    ap.add_argument("--scale", action="append", default=[], metavar="NAME=F",
                    help="with --streams: kernels whose name contains NAME take F times as long")
    a = ap.parse_args()
    if a.summarize:
        return summarize(a.summarize, a.by_grid, a.top)
    if a.streams:
        return report_streams(a.streams, a.scale)
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

"""Prefill chunk traces side by side: each trace's wall and kernels' sum, then
the kernels (by name and launch shape) whose summed time differs most between
the first trace and any other, in ms. For device_run.sh's chunk-ab step: two
builds, or a build and its switch, profiled on the same chunk.

    python3 csrc/cuda/chunk_diff.py old=chunk_old.json new=chunk_new.json [sw1=...] [--top 20]

A trace is chain_profile.py's (CUPTI kernel events, torch.profiler's JSON)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chain_profile import chunk_sums  # noqa: E402  (chain_profile's own sums and kernel names)


def kernel_times(path):
    """(wall us, busy us, {name grid block: summed us}) of one chunk trace."""
    with open(path) as f:
        kernels, wall, busy, by = chunk_sums(json.load(f))
    if not kernels:
        raise SystemExit(f"{path}: no kernel events (CUPTI saw none)")
    return wall, busy, {k: v[0] for k, v in by.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", metavar="NAME=TRACE")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    runs = []
    for item in args.traces:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"{item!r}: want NAME=TRACE")
        if not os.path.exists(path):
            print(f"{name}: {path} missing (its run failed); left out")
            continue
        runs.append((name, *kernel_times(path)))
    if len(runs) < 2:
        raise SystemExit("fewer than two traces to compare")
    names = [r[0] for r in runs]
    print("            " + "".join(f"{n:>12s}" for n in names))
    print("wall ms     " + "".join(f"{r[1] / 1000:12.1f}" for r in runs))
    print("kernels ms  " + "".join(f"{r[2] / 1000:12.1f}" for r in runs))
    keys = set().union(*(r[3] for r in runs))
    base = runs[0][3]
    spread = {k: max(abs(r[3].get(k, 0.0) - base.get(k, 0.0)) for r in runs[1:]) for k in keys}
    print(f"\nthe {args.top} kernels that differ most from {names[0]} (ms summed over the chunk):")
    print("".join(f"{n:>10s}" for n in names) + "  kernel grid block")
    for k in sorted(keys, key=lambda k: (-spread[k], -base.get(k, 0.0), k))[:args.top]:
        print("".join(f"{r[3].get(k, 0.0) / 1000:10.2f}" for r in runs) + f"  {k}")


if __name__ == "__main__":
    main()

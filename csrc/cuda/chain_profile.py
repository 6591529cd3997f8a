"""Where a decode step's time goes on the real chain: a few one-token steps of
the full-size synthetic q2 model (the decode graph as it runs: PDL, its
streams, its waits) timed kernel by kernel by CUPTI, through the device's
torch.profiler. ncu serializes kernels and flushes caches, and leaving a kind of
launch out (wip/ablate) gives only sums; this gives each kernel's place.

    python3 csrc/cuda/chain_profile.py [--numerics qat-q8] [--ctx 2048] [--steps 4]
                                       [--timeline 120] [--trace trace.json]
    python3 csrc/cuda/chain_profile.py --chunk 2048 [--ctx 2048]
    python3 csrc/cuda/chain_profile.py --from-trace trace.json [--timeline 120]
    python3 csrc/cuda/chain_profile.py --from-trace trace.json --chunk 2048

--chunk N traces one prefill chunk of N tokens after ctx tokens instead: its
kernels are large and mostly one after another, so it prints the wall and each
kernel's summed duration (by name and launch shape), each stream's busy time and
gaps (a kernel waiting for SMs that another stream's blocks hold shows as a gap
of the main stream), and the chunk attention by layer kind. With --from-trace, --chunk N reads such a trace (N its tokens).

With PDL a kernel is launched while its predecessor runs and waits inside, so
its start and duration say little; its end is what counts. Printed:
  - each step's wall (first kernel's start to last kernel's end);
  - the end frontier: the kernels sorted by end, each charged the time the
    step's latest end moved when it ended (so kernels beside the chain that
    end earlier are charged nothing); the charges sum to the wall;
  - Flash's chain pairs: a kernel's end minus the end of the kernel before it
    in the decode order (the latest-ending kernel of that name), per layer;
  - the layer halves: the spans between the HC expands' ends, the attention
    halves of the layers with an indexer apart;
  - with --timeline N, the first N kernels of step 1 (start, end, duration
    in us from the step's start, stream, grid, block).
Needs torch (the device image has it); the trace is written for other reads,
and --from-trace reads one again (no GPU needed)."""
import argparse
import collections
import json
import os
import re
import statistics
import tempfile

import numpy as np

# (kernel, the kernels that may come just before it on the decode chain):
# Flash's one-token order in qat-q8 (names as CUPTI gives them)
CHAIN_PAIRS = [
    ("k_hc_pre_collapse", ("k_hc_expand",)),
    ("k_route", ("k_linear1",)),
    ("k_expert_dp4a<16>", ("k_route",)),
    ("k_expert_mma1<16, true", ("k_route",)),   # DS4_CUDA_NO_DP4A=1
    ("k_expert_dp4a<10>", ("k_swiglu_act8",)),
    ("k_expert_mma1<10, true", ("k_swiglu_act8",)),
    ("k_attention", ("k_state", "k_compress", "k_idx_select")),
    ("k_attn_combine", ("k_attention",)),
    ("k_q8_mma1<8, true>", ("k_act8",)),
    ("k_hc_expand", ("k_q8_mma1<8, true>", "k_expert_dp4a<10>", "k_expert_mma1<10, true")),
]


def short(name):
    return re.sub(r"^void ", "", name.split("(")[0])


def steps_of(trace):
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    steps = []
    for e in kernels:
        if e["name"].startswith("k_embed"):   # a step begins with the embedding
            steps.append([])
        if steps:
            steps[-1].append(e)
    return steps


def frontier(steps):
    charge, count = collections.defaultdict(float), collections.Counter()
    for st in steps:
        front = st[0]["ts"]
        for e in sorted(st, key=lambda e: e["ts"] + e["dur"]):
            end = e["ts"] + e["dur"]
            count[short(e["name"])] += 1
            if end > front:
                charge[short(e["name"])] += end - front
                front = end
    return charge, count


def chain_pairs(steps):
    gaps = collections.defaultdict(list)
    for st in steps:
        by_end = sorted(st, key=lambda e: e["ts"] + e["dur"])
        last_end = {}
        for e in by_end:
            name, end = short(e["name"]), e["ts"] + e["dur"]
            for kernel, before in CHAIN_PAIRS:
                if name.startswith(kernel):
                    prev = [v for k, v in last_end.items() if k.startswith(before)]
                    if prev:
                        gaps[f"{kernel} after {' / '.join(before)}"].append(end - max(prev))
            last_end[name] = end
    return gaps


def layer_halves(steps):
    """A layer's two halves as the span between the ends of the HC expands
    that close them (the first attention half from the step's start): the
    attention halves of layers with an indexer (a k_idx_select among their
    kernels) apart from the others."""
    halves = collections.defaultdict(list)
    for st in steps:
        by_end = sorted(st, key=lambda e: e["ts"] + e["dur"])
        start, kinds, layer = st[0]["ts"], set(), 0
        for e in by_end:
            kinds.add(short(e["name"]))
            if short(e["name"]).startswith("k_hc_expand"):
                end = e["ts"] + e["dur"]
                if layer % 2:
                    key = "FFN"
                else:
                    key = "attention, indexer" if any(k.startswith("k_idx_select") for k in kinds) else "attention"
                halves[key].append(end - start)
                start, kinds, layer = end, set(), layer + 1
    return halves


def report(steps, timeline):
    walls = [max(e["ts"] + e["dur"] for e in st) - st[0]["ts"] for st in steps]
    print(f"{len(steps)} steps, {len(steps[0])} kernels each; wall us: {[round(w, 1) for w in walls]}")
    charge, count = frontier(steps)
    n, total = len(steps), sum(charge.values()) / len(steps)
    print(f"\nend frontier, us a step ({total:.1f} in all):")
    for name, v in sorted(charge.items(), key=lambda kv: -kv[1]):
        print(f"{v / n:9.1f} {100 * v / n / total:5.1f}%  {count[name] / n:5.0f} calls  {name}")
    print("\nchain pairs (a kernel's end minus its predecessor's), us:")
    for key, v in chain_pairs(steps).items():
        print(f"  {key:50s} n {len(v) / n:4.0f} a step  mean {statistics.mean(v):6.1f}  median "
              f"{statistics.median(v):6.1f}  per step {sum(v) / n / 1000:.2f} ms")
    print("\nlayer halves (expand end to expand end), us:")
    for key, v in layer_halves(steps).items():
        print(f"  {key:20s} n {len(v) / n:4.0f} a step  mean {statistics.mean(v):6.1f}  median "
              f"{statistics.median(v):6.1f}  per step {sum(v) / n / 1000:.2f} ms")
    if timeline:
        st = steps[min(1, len(steps) - 1)]
        t0 = st[0]["ts"]
        print("\nstart     end   dur  stream grid block kernel")
        for e in st[:timeline]:
            a = e["args"]
            print(f"{e['ts'] - t0:8.1f} {e['ts'] + e['dur'] - t0:8.1f} {e['dur']:6.1f} s{a.get('stream')} "
                  f"{a.get('grid')} {a.get('block')} {short(e['name'])}")


def prefill_chunk(session, chunk, trace_path):
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        session.eval(chunk)
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        chunk_report(json.load(f), len(chunk))


def chunk_sums(trace):
    """A chunk trace's kernels (by start), wall and summed durations (us), and
    {"name grid block": [summed us, calls]}; kernels empty if CUPTI saw none."""
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    by = collections.defaultdict(lambda: [0.0, 0])
    if not kernels:
        return kernels, 0.0, 0.0, by
    wall = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    for e in kernels:
        a = e.get("args", {})
        key = f"{short(e['name'])} {a.get('grid')} {a.get('block')}"
        by[key][0] += e["dur"]
        by[key][1] += 1
    return kernels, wall, sum(e["dur"] for e in kernels), by


def chunk_report(trace, n_tokens):
    kernels, wall, busy, by = chunk_sums(trace)
    if not kernels:
        print("no kernels traced (CUPTI saw none)")
        return
    print(f"a chunk of {n_tokens} tokens: {len(kernels)} kernels, wall {wall / 1000:.1f} ms "
          f"({n_tokens / wall * 1e6:.0f} tok/s), kernels' durations sum to {busy / 1000:.1f} ms")
    print("\n     ms   % wall  calls  kernel grid block")
    for key, (d, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"{d / 1000:7.2f} {100 * d / wall:6.1f}% {c:6d}  {key}")
    streams = collections.defaultdict(list)
    for e in kernels:
        streams[e.get("tid")].append(e)
    print("\nby stream (the busiest first):  kernels  busy ms  first start to last end ms  gaps ms")
    for tid, ks in sorted(streams.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy_s = sum(e["dur"] for e in ks)
        span = max(e["ts"] + e["dur"] for e in ks) - ks[0]["ts"]
        print(f"  stream {tid!s:>6} {len(ks):8d} {busy_s / 1000:8.1f} {span / 1000:28.1f} {(span - busy_s) / 1000:8.1f}")
    # the chunk attention launches once a layer, in layer order; Flash's
    # layers by their compress ratio (0: the window only; 4: with the indexer)
    from ds4.testing import ModelConfig
    ratios = ModelConfig.flash().compress_ratios
    attn = [e for e in kernels if short(e["name"]).startswith(("k_attention_tc", "k_attention_bf16"))]
    if len(attn) == len(ratios):
        kinds = collections.defaultdict(list)
        note = {0: " (window only)", 4: " (indexer)"}
        for ratio, e in zip(ratios, attn):
            kinds[f"ratio {ratio}{note.get(ratio, '')}"].append(e["dur"])
        print("\nchunk attention by layer kind:   ms  layers  us a layer")
        for kind, ds in kinds.items():
            print(f"  {kind:24s} {sum(ds) / 1000:7.2f} {len(ds):7d} {statistics.mean(ds):10.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numerics", default="qat-q8")
    ap.add_argument("--ctx", type=int, default=2048)
    # four: one token of each position mod 4, the fourth completing the ratio-4
    # layers' compression windows (1.2 ms more in the twentieth session, which
    # three-step traces never held)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeline", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=0, help="trace a prefill chunk of N tokens after ctx")
    ap.add_argument("--trace", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "trace.json"))
    ap.add_argument("--from-trace", metavar="FILE",
                    help="read an earlier run's trace (its decode steps; a chunk's with --chunk N); run nothing")
    args = ap.parse_args()
    if args.from_trace:
        try:
            with open(args.from_trace) as f:
                trace = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{args.from_trace}: not a readable chrome trace ({e})")
        if args.chunk:
            return chunk_report(trace, args.chunk)
        steps = steps_of(trace)
        if not steps:
            print(f"{args.from_trace}: no decode step (no k_embed launch) in the trace")
            return
        return report(steps, args.timeline)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import ds4
    import ds4.bench as bench
    torch.zeros(1).cuda()   # torch's context is the one the engine uses
    path = bench.write_synthetic(tempfile.mkdtemp(), "q2")
    n_ctx = args.ctx + max(args.chunk, 64)
    model = ds4.load(path, backend="cuda", ctx=n_ctx, synthetic=True, numerics=args.numerics)
    session = model.session(n_ctx)
    ids = bench.bench_tokens(model.tokenizer, n_ctx, None)
    step = bench.prefill_step(session)
    for start in range(0, args.ctx, step):
        logits = session.eval(ids[start:start + step])
    if args.chunk:
        return prefill_chunk(session, ids[args.ctx:args.ctx + args.chunk], args.trace)
    for _ in range(4):   # the graph captured and warm
        logits = session.eval([int(np.argmax(logits))])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            logits = session.eval([int(np.argmax(logits))])
        torch.cuda.synchronize()
    prof.export_chrome_trace(args.trace)
    with open(args.trace) as f:
        steps = steps_of(json.load(f))
    if not steps:
        print("no kernels traced (CUPTI saw none)")
        return
    report(steps, args.timeline)


if __name__ == "__main__":
    main()

"""What one profiled launch spent its instructions and stalls on, from the SASS
table device_run.sh's ncu step writes ($OUT/ncu_sass.csv: each instruction with
its executed count and warp-stall samples).

    python csrc/cuda/ncu_sass.py ncu_sass.csv                  # one launch
    python csrc/cuda/ncu_sass.py before.csv after.csv          # two, side by side
    python csrc/cuda/ncu_sass.py ncu_sass.csv --stall barrier --context 10

A table of several launches (NCU_COUNT > 1) is read as that many launches, side
by side.
Prints the executed warp instructions by opcode, the stall samples by reason,
and the instructions holding the most samples of one reason (a stall is
sampled at the instruction that waits: after a barrier, the one behind it),
each with the instructions before it, so the wait can be read off the SASS."""
import argparse
import collections
import csv
import re

REASONS = ("barrier", "wait", "short_sb", "long_sb", "mio", "math", "selected", "not_selected",
           "lg", "branch_resolving", "dispatch", "drain", "no_inst", "membar", "sleep", "tex", "misc")


def read(path):
    """[(kernel name, header, rows)], a launch each: each launch's table starts
    with a line naming its kernel, then the header."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    launches = []
    for line in lines:
        if line and line[0] == "Kernel Name":
            launches.append([line[1] if len(line) > 1 else "?", None, []])
        elif launches and launches[-1][1] is None:
            launches[-1][1] = line
        elif launches and len(line) == len(launches[-1][1]):
            launches[-1][2].append(line)
    # ncu's source page prints each launch's table twice: one copy each
    unique = []
    for x in launches:
        if not unique or tuple(x) != unique[-1]:
            unique.append(tuple(x))
    return unique


def number(text):
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def opcode(source):
    """The opcode of a SASS line without its predicate and modifiers."""
    text = re.sub(r"^@!?U?P\w+\s+", "", source.strip())
    return text.split()[0].split(".")[0] if text else "?"


def summary(launch):
    kernel, head, rows = launch
    col = {name: i for i, name in enumerate(head)}
    executed = collections.Counter()
    stalls = collections.Counter()
    for r in rows:
        executed[opcode(r[col["Source"]])] += number(r[col["Instructions Executed"]])
        for reason in REASONS:
            if f"stall_{reason}" in col:
                stalls[reason] += number(r[col[f"stall_{reason}"]])
    return kernel, executed, stalls


def show_counts(title, counters, top):
    totals = [sum(c.values()) for c in counters]
    print(f"{title}: " + " | ".join(f"{t:,.0f}" for t in totals))
    keys = sorted(set().union(*counters), key=lambda k: -max(c[k] for c in counters))[:top]
    for k in keys:
        cells = " | ".join(f"{c[k]:14,.0f} {100 * c[k] / max(t, 1):5.1f}%" for c, t in zip(counters, totals))
        print(f"  {k:18s} {cells}")


def show_waits(name, launch, reason, top, context):
    _, head, rows = launch
    col = {name: i for i, name in enumerate(head)}
    key = col[f"stall_{reason}"]
    order = sorted(range(len(rows)), key=lambda i: -number(rows[i][key]))[:top]
    print(f"\n{name}: the {top} instructions with the most {reason} samples")
    for i in order:
        if not number(rows[i][key]):
            break
        print(f"-- {number(rows[i][key]):,.0f} samples")
        for r in rows[max(0, i - context):i + 1]:
            print(f"  {r[col['Address']][-5:]} {number(r[col['Instructions Executed']]):>12,.0f} "
                  f"{number(r[key]):>8,.0f}  {r[col['Source']].strip()[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="ncu_sass.csv of each launch")
    ap.add_argument("--stall", default="barrier", choices=REASONS,
                    help="the stall reason whose heaviest instructions are listed")
    ap.add_argument("--top", type=int, default=5, help="instructions listed (and opcodes shown: 4x)")
    ap.add_argument("--context", type=int, default=6, help="instructions shown before each")
    args = ap.parse_args()
    launches = [(f"{p} #{i + 1}", launch) for p in args.files for i, launch in enumerate(read(p))]
    results = [summary(launch) for _, launch in launches]
    for (name, _), (kernel, _, _) in zip(launches, results):
        print(f"{name}: {kernel}")
    show_counts("warp instructions executed", [e for _, e, _ in results], 4 * args.top)
    show_counts("stall samples", [s for _, _, s in results], len(REASONS))
    for name, launch in launches:
        show_waits(name, launch, args.stall, args.top, args.context)


if __name__ == "__main__":
    main()

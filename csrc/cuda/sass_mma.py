"""How each tensor-core loop of a kernel was scheduled, from a cubin compiled
here (no GPU): for every loop holding MMAs, its instruction count, NOPs, and
for each MMA how many instructions before it the shared-memory load (LDS or
ldmatrix) of its B operand was issued. A distance of 1-3 means the MMA waits
on that load (short-scoreboard stalls in ncu); the twenty-fourth session found a 21%
slower k_linear_2bit copy this way, its loads 1-3 before their IMMAs where
the same code alone had them 3-14 before.

Also each loop's sum of the stall counts ptxas wrote into the instructions'
control bits (the cycles one warp spends on a turn of the loop before any
scoreboard wait: ncu's `wait` stalls), and for each MMA how many instructions
after it its result is first read. A fixed-latency MMA read a few instructions
later sits behind a stall count of ~24 cycles; the twenty-fifth session found
k_linear_q8s's IMMAs all writing one register quad at 128 registers (read 2-16
after, stall counts 547 a 16-MMA loop) and 331 at 200 registers.

    nvcc -O3 -std=c++17 -cubin -arch=sm_90 -Icsrc csrc/cuda/ds4_cuda.cu -o /tmp/k.cubin
    python3 csrc/cuda/sass_mma.py /tmp/k.cubin k_linear_2bit

Needs cuobjdump and nvdisasm on PATH (CUDA's, or the wheels
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm: their bin/ folders).
"""
import argparse
import re
import subprocess
import sys

# an instruction, its encoding's low word, then (next line) the high word with the control bits
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);\s*/\* 0x[0-9a-f]{16} \*/\s*/\* 0x([0-9a-f]{16}) \*/")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
MMA_B = re.compile(r"\b[IH]MMA\S*\s+R\d+,\s*R\d+\S*,\s*(R\d+)")
MMA_D = re.compile(r"\b([IH]MMA\S*)\s+R(\d+),")
REG = re.compile(r"\bR(\d+)")
LOAD_DST = re.compile(r"\b(LDSM|LDS)(\S*)\s+R(\d+),")


def functions(cubin):
    try:
        out = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("sass_mma.py: cuobjdump not on PATH (see this file's docstring)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"sass_mma.py: cuobjdump failed: {e.stderr.strip()}")
    for part in re.split(r"\n\s+Function : ", out)[1:]:
        name = part.split("\n", 1)[0].strip()
        yield name, [(int(a, 16), text.strip(), stall_count(int(hi, 16))) for a, text, hi in INSTR.findall(part)]


def stall_count(high_word):
    """the stall field of an instruction's control bits (bits 105-108 of its 128)"""
    return (high_word >> 41) & 0xF


def mma_loops(instrs):
    """(start address, body, stall counts) of each backward branch's loop that holds an
    MMA; instrs: (address, text, stall count)"""
    index = {addr: i for i, (addr, *_) in enumerate(instrs)}
    for i, (addr, text, _) in enumerate(instrs):
        m = BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            part = instrs[index[target]:i + 1]
            body = [t for _, t, _ in part]
            if any(MMA_B.search(t) for t in body):
                yield target, body, [c for _, _, c in part]


def loaded_registers(text):
    """the registers a shared-memory load writes (LDS .64 / .128, ldmatrix .2 / .4: consecutive)"""
    m = LOAD_DST.search(text)
    if not m:
        return range(0)
    op, suffix, first = m.group(1), m.group(2), int(m.group(3))
    if op == "LDSM":
        count = 4 if suffix.endswith(".4") else 2 if suffix.endswith(".2") else 1
    else:
        count = 4 if ".128" in suffix else 2 if ".64" in suffix else 1
    return range(first, first + count)


def load_distances(body):
    """for each MMA, instructions back (around the loop) to the load of its B operand"""
    out = []
    for k, text in enumerate(body):
        m = MMA_B.search(text)
        if not m:
            continue
        reg = int(m.group(1)[1:])
        for d in range(1, len(body)):
            if reg in loaded_registers(body[(k - d) % len(body)]):
                out.append(d)
                break
        else:
            out.append(None)   # B not loaded from shared memory in the loop (held in registers)
    return out


def result_registers(text):
    """an MMA's result registers: four (32-bit accumulators), two for fp16 ones"""
    m = MMA_D.search(text)
    if not m:
        return set()
    count = 2 if re.match(r"HMMA\.\d+\.F16", m.group(1)) else 4
    return set(range(int(m.group(2)), int(m.group(2)) + count))


def read_distances(body):
    """for each MMA, instructions forward (around the loop) to the first that reads its
    result; None where it is overwritten first or never read in the loop"""
    out = []
    for k, text in enumerate(body):
        dst = result_registers(text)
        if not dst:
            continue
        for d in range(1, len(body)):
            parts = body[(k + d) % len(body)].split(None, 1)
            operands = parts[1].split(",") if len(parts) > 1 else []
            stores = parts[0].startswith(("ST", "RED", "ATOM"))   # a store's first operand is read too
            sources = operands if stores else operands[1:]
            if any(int(r) in dst for o in sources for r in REG.findall(o)):
                out.append(d)
                break
            if operands and not stores and any(int(r) in dst for r in REG.findall(operands[0])):
                out.append(None)
                break
        else:
            out.append(None)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cubin")
    ap.add_argument("function", help="a substring of the mangled names to show")
    ap.add_argument("--max-loop", type=int, default=400, help="loops longer than this are left out (outer loops)")
    args = ap.parse_args()
    found = False
    for name, instrs in functions(args.cubin):
        if args.function not in name:
            continue
        found = True
        print(f"{name}: {len(instrs)} instructions")
        for start, body, stalls in mma_loops(instrs):
            if len(body) > args.max_loop:
                continue
            dist = load_distances(body)
            nops = sum(t.startswith("NOP") for t in body)
            shown = ", ".join("-" if d is None else str(d) for d in dist)
            read = ", ".join("-" if d is None else str(d) for d in read_distances(body))
            print(f"  loop at {start:#x}: {len(body)} instructions, {nops} NOP, {len(dist)} MMA, stall counts "
                  f"{sum(stalls)}; B loaded {shown} before; result read {read} after")
    if not found:
        sys.exit(f"sass_mma.py: no function matching {args.function!r} in {args.cubin}")


if __name__ == "__main__":
    main()

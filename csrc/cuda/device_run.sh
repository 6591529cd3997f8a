#!/bin/bash
# On the lent GPU machine, from the worktree root: install the carried wheels,
# build the engine and the CUDA backend, then run the steps named.
#   test       tests/test_cuda.py against the CPU engine
#   sanitize   compute-sanitizer memcheck on a short tiny-model run
#   bench-mid  prefill/decode speed on the mid model
#   bench-mid-nograph  the same without the decode graph
#   bench-full full-size synthetic q2 (needs an 80+ GiB GPU)
#   bench-full-short  the same at 1K context (no indexer selection yet)
#   profile-full  per-kernel times and DRAM bytes of one full-size decode step (ncu)
set -o pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site ../.whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
{ make build PYTHON=python3 && make cuda CUDA_ARCHS="-gencode arch=compute_90,code=sm_90"; } \
  > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
  test)
    timeout 420 python3 -m pytest -q -s -x -p no:cacheprovider tests/test_cuda.py 2>&1 \
      | tee $OUT/test.log | grep -E "CUDA-vs|passed|failed|Error|error|assert" ;;
  sanitize)
    python3 -m ds4.testing /tmp/tiny.gguf --preset tiny --variant q2 --seed 1 >/dev/null
    cat > /tmp/short.py <<'PY'
import ds4
m = ds4.load('/tmp/tiny.gguf', backend='cuda', ctx=256)
for num in ('exact', 'qat'):
    s = m.session(numerics=num)
    s.eval(list(range(1, 40)), all_logits=True)
    for t in range(5): s.eval([t + 7])
    s.rewind(30); s.eval([3, 4])
print('sanitized run done')
PY
    for tool in memcheck racecheck; do
      timeout 50 compute-sanitizer --tool $tool --print-limit 20 python3 /tmp/short.py 2>&1 \
        | tail -6 | tee $OUT/sanitize_$tool.log
    done ;;
  bench-mid)
    python3 -m ds4.testing /tmp/mid.gguf --preset mid --variant q2 --seed 3 >/dev/null
    timeout 200 python3 csrc/cuda/bench.py /tmp/mid.gguf --ctx 4096 --prompt 2048 --decode 64 \
      2>&1 | tee $OUT/bench_mid.log ;;
  bench-mid-nograph)
    DS4_CUDA_NO_GRAPH=1 timeout 200 python3 csrc/cuda/bench.py /tmp/mid.gguf --ctx 4096 \
      --prompt 2048 --decode 32 2>&1 | tee $OUT/bench_mid_nograph.log ;;
  bench-full)
    python3 -m ds4.testing /tmp/full.gguf --preset flash --variant q2 --sparse >/dev/null
    timeout 400 python3 csrc/cuda/bench.py /tmp/full.gguf --synthetic --ctx 4096 --prompt 2048 \
      --decode 32 2>&1 | tee $OUT/bench_full.log ;;
  bench-full-short)
    timeout 200 python3 csrc/cuda/bench.py /tmp/full.gguf --synthetic --ctx 4096 --prompt 1024 \
      --decode 24 2>&1 | tee $OUT/bench_full_short.log ;;
  profile-full)
    DS4_CUDA_NO_GRAPH=1 timeout 300 ncu --profile-from-start off --clock-control none --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      python3 csrc/cuda/profile_step.py /tmp/full.gguf --synthetic --prompt 2048 \
      > $OUT/ncu_full.csv 2> $OUT/ncu_full.err; tail -3 $OUT/ncu_full.err; wc -l $OUT/ncu_full.csv ;;
  esac
done

#!/usr/bin/env bash
# One H200 call: the fused Triton kernel's GPU tests (compiled), the cache-write kernel's
# GPU tests, a timing of the fused kernels beside the bf16 peers at the two long shapes,
# then Nsight Compute on the fused kernels (Triton and Mosaic GPU) at B 8 / 32k through
# ncu_probe.sh: warp stall reasons, issue rate, DRAM throughput, per-instruction samples.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_ncu.sh
#   TESTS=0 skips the tests, BENCH=0 the timing, NCU=0 the profile
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/ncu_run_log.txt"
{ echo "# commit ${COMMIT:-unknown}; kernel $(uname -r)"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
  $PY -c 'import jax; print("# jax", jax.__version__)'; } > "$LOG" 2>&1

if [[ ${TESTS:-1} == 1 ]]; then
  T="$OUT/gpu_tests.txt"
  head -3 "$LOG" > "$T"
  INNERQ_KERNEL_TESTS=gpu timeout "${TESTS_S:-240}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py -m "slow or not slow" >> "$T" 2>&1
  echo "fused kernel GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$T"
  timeout 120 $PY -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_cache_update.py \
    -rA >> "$T" 2>&1
  echo "cache-write GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$T"
  grep -E "passed|failed" "$T" | tail -4
fi

if [[ ${BENCH:-1} == 1 ]]; then
  V='["bf16_pallas", "cudnn", "innerq_fused", "innerq-h_fused", "outerq_fused", "innerq_mgpu"]'
  timeout "${BENCH_S:-200}" $PY benchmarks/bench_kernels.py --suite points --tag _refs \
    --out "$OUT" --reps 5 --points "[[8, 32768, {}, $V], [1, 131072, {}, $V]]" \
    > /tmp/bench_refs.log 2>&1
  echo "bench rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E " ms |MISMATCH|FAILED" /tmp/bench_refs.log | tee -a "$LOG" | tail -14
fi

if [[ ${NCU:-1} == 1 ]]; then
  # ncu_probe.sh: the benchmark script itself segfaults under ncu (this script's first run,
  # results/kernels_points_refs_log.txt); the probe profiles a small driver instead
  OUT=/tmp/ncu_out bash benchmarks/ncu_probe.sh triton mgpu > /dev/null 2>&1
  cat /tmp/ncu_out/ncu_probe_log.txt >> "$LOG"
  grep -E "rc=|Duration|Executed Instructions" /tmp/ncu_out/ncu_probe_log.txt | cut -c1-200
  for k in triton mgpu; do
    cp /tmp/ncu_out/ncu_${k}_details.csv /tmp/ncu_out/ncu_${k}_source.csv.gz "$OUT/" 2>/dev/null
  done
fi
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# One H200 call: the fused Triton kernel's GPU tests (compiled), the cache-write kernel's
# GPU tests, a timing of the fused kernels beside the bf16 peers at the two long shapes,
# then Nsight Compute on the fused kernels (Triton and Mosaic GPU) at B 8 / 32k: warp
# stall reasons, issue rate, DRAM throughput, per-instruction samples.
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
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "ncu: ${NCU_BIN:-not found}" | tee -a "$LOG"
  # kernels launched one by one (no command buffers), each profiled kernel replayed per pass
  # and no preallocated pool: kernel replay saves and restores the memory a kernel may
  # write, and with jax's 75% pool that is about 105 GB (the profiled process segfaulted)
  export XLA_FLAGS="--xla_gpu_enable_command_buffer=" XLA_PYTHON_CLIENT_PREALLOCATE=false
  P='[[8, 32768, {}, ["innerq_fused", "innerq_mgpu"]]]'
  timeout "${NCU_S:-240}" "$NCU_BIN" --clock-control none --target-processes all \
    -k "regex:innerq_decode|mgpu_decode" --launch-count 4 --set full --import-source yes \
    -f -o "$OUT/ncu_b8_32k" \
    $PY benchmarks/bench_kernels.py --suite points --calls 1 --reps 1 --out /tmp/ncu_bench \
    --points "$P" > /tmp/ncu.log 2>&1
  echo "ncu rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "==PROF==|==ERROR==|==WARNING==| ms |Error|error" /tmp/ncu.log | head -30 | tee -a "$LOG"
  if [[ -f "$OUT/ncu_b8_32k.ncu-rep" ]]; then
    "$NCU_BIN" -i "$OUT/ncu_b8_32k.ncu-rep" --page details --csv > /tmp/details.csv 2>&1
    "$NCU_BIN" -i "$OUT/ncu_b8_32k.ncu-rep" --page raw --csv > /tmp/raw.csv 2>&1
    "$NCU_BIN" -i "$OUT/ncu_b8_32k.ncu-rep" --page source --csv --print-source sass \
      > /tmp/source.csv 2>&1 || "$NCU_BIN" -i "$OUT/ncu_b8_32k.ncu-rep" --page source --csv \
      > /tmp/source.csv 2>&1
    gzip -c /tmp/details.csv > "$OUT/ncu_b8_32k_details.csv.gz"
    gzip -c /tmp/raw.csv > "$OUT/ncu_b8_32k_raw.csv.gz"
    gzip -c /tmp/source.csv > "$OUT/ncu_b8_32k_source.csv.gz"
    ls -la "$OUT" | tee -a "$LOG"
    # the headline rows, for the log
    grep -E '"(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Issue Slots Busy|Issued Ipc Active|No Eligible|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction)"' \
      /tmp/details.csv | cut -c1-400 | head -60 | tee -a "$LOG"
  else
    tail -30 /tmp/ncu.log | tee -a "$LOG"
  fi
fi
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

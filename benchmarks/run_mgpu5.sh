#!/usr/bin/env bash
# Mosaic GPU kernel, round 5 (one H200 call): the unpack as one lop3 per code pair and FMA
# contraction, guided by the Nsight Compute profile (results/ncu/). SASS opcode counts of
# the compiled kernel, the GPU tests, kernel-only timings of the tunables (window program
# in the kernel with the splits that keep one wave), the side-by-side timing against the
# Triton kernel and the bf16 peers, then Nsight Compute on the new kernel.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_mgpu5.sh
source benchmarks/gpu_env.sh
LOG="$OUT/mgpu5_log.txt"
start_log "$LOG"

mosaic_sass "$OUT/mgpu5_sass.log.gz"

echo "== GPU tests (elapsed $SECONDS s)" | tee -a "$LOG"
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_mgpu_kernels.py -k "emit-xla" -rA \
  > "$OUT/mgpu5_gpu_tests.txt" 2>&1
echo "GPU tests rc=$?" | tee -a "$OUT/mgpu5_gpu_tests.txt" "$LOG"
grep -E "passed|failed" "$OUT/mgpu5_gpu_tests.txt" | tail -2 | tee -a "$LOG"

echo "== tunables, kernel alone and op (elapsed $SECONDS s)" | tee -a "$LOG"
P='[{"explicit_barriers": true}, {"explicit_barriers": true, "ablate": ["stream"]},
    {"windows": "kernel", "explicit_barriers": true},
    {"windows": "kernel", "explicit_barriers": true, "num_splits": 5},
    {"windows": "kernel", "explicit_barriers": true, "num_splits": 5, "num_stages": 6}]'
timeout 170 $PY benchmarks/mgpu_probe.py --stage kernel --points "$P" --out "$OUT" --tag _5 \
  2>&1 | grep -E " op |FAILED" | tee -a "$LOG"

BEST=$($PY benchmarks/mgpu_probe.py --stage best --out "$OUT" --tag _5)
echo "best point at B8/32k: $BEST" | tee -a "$LOG"

echo "== beside Triton and bf16 (elapsed $SECONDS s)" | tee -a "$LOG"
V='["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu"]'
timeout 130 $PY benchmarks/bench_kernels.py --suite points --tag _mgpu5 --out "$OUT" --reps 5 \
  --options "{\"innerq_mgpu\": $BEST}" --points "[[8, 32768, {}, $V], [1, 131072, {}, $V]]" \
  > /tmp/bench.log 2>&1
echo "bench rc=$?" | tee -a "$LOG"
grep -E " ms |MISMATCH" /tmp/bench.log | tee -a "$LOG"

echo "== Nsight Compute (elapsed $SECONDS s)" | tee -a "$LOG"
OUT=/tmp/ncu_out bash benchmarks/ncu_probe.sh mgpu > /dev/null 2>&1
grep -E "rc=|Duration|Executed Instructions|Issued Ipc|Registers" /tmp/ncu_out/ncu_probe_log.txt | cut -c1-260 | tee -a "$LOG"
cp /tmp/ncu_out/ncu_mgpu_details.csv "$OUT/ncu_mgpu5_details.csv" 2>/dev/null
cp /tmp/ncu_out/ncu_mgpu_source.csv.gz "$OUT/ncu_mgpu5_source.csv.gz" 2>/dev/null
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

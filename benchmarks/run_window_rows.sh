#!/usr/bin/env bash
# One H200 call: the fused Triton kernel's window program in steps of 32 (default), 64 and
# 128 rows at the short contexts: compiled GPU tests of the new cases, the timed programs
# traced (kernel duration per call) and the shape-suite points beside the bf16 peer.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_window_rows.sh
source benchmarks/gpu_env.sh
LOG="$OUT/window_rows_log.txt"
start_log "$LOG"
INNERQ_KERNEL_TESTS=gpu timeout 120 python3 -m pytest -q -p no:cacheprovider -rA -m "slow or not slow" \
  tests/test_kernels.py -k "win128 or win64 or innerq2-G32-D128-gqa4" > "$OUT/window_rows_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"; grep -E "passed|failed" "$OUT/window_rows_gpu_tests.txt" | tail -1 >> "$LOG"
SH='[[1, 4096, {}], [8, 8192, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}]]'
for W in 32 64 128; do
  timeout 100 python3 benchmarks/bench_kernels.py --suite trace --tag "_window_rows$W" --out "$OUT" \
    --reps 5 --options "{\"ops\": [\"innerq_fused\"], \"innerq_fused\": {\"window_rows\": $W}}" \
    --shapes "$SH" 2>&1 | grep -E "innerq_fused|  +[0-9.]+ us" | grep -v "^\s*$" | sed "s/^/[rows $W] /" >> "$LOG"
  echo "trace rows $W rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
done
V='["bf16_pallas", "innerq_fused", "innerq_fused@{\"window_rows\": 64}", "innerq_fused@{\"window_rows\": 128}"]'
SM='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
timeout "${BENCH_S:-200}" python3 benchmarks/bench_kernels.py --suite points --tag _window_rows \
  --out "$OUT" --reps 7 --points "[[1, 4096, {}, $V], [8, 8192, $SM, $V], [8, 4096, {}, $V],
    [1, 32768, {}, $V], [8, 32768, {}, $V]]" > "$OUT/kernels_points_window_rows_log.txt" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^\[| ms |MISMATCH|FAILED" "$OUT/kernels_points_window_rows_log.txt" | grep -vE "^\s+File" >> "$LOG"

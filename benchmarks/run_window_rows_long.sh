#!/usr/bin/env bash
# One H200 call: window_rows 64 against the default 32 at the long contexts (does the window
# program's larger step cost the quantized programs registers?), beside the bf16 peer.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_window_rows_long.sh
source benchmarks/gpu_env.sh
V='["bf16_pallas", "innerq_fused", "innerq_fused@{\"window_rows\": 64}"]'
timeout "${BENCH_S:-300}" python3 benchmarks/bench_kernels.py --suite points --tag _window_rows_long \
  --out "$OUT" --reps 5 --points "[[8, 32768, {}, $V], [1, 131072, {}, $V], [8, 16384, {}, $V]]" \
  > "$OUT/kernels_points_window_rows_long_log.txt" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)"
grep -E "^\[| ms |MISMATCH|FAILED" "$OUT/kernels_points_window_rows_long_log.txt" | grep -vE "^\s+File"

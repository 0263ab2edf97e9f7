#!/usr/bin/env bash
# Round 12, fourth H200 call: the cache-write kernel's GPU tests at its final default (8
# warps per group program; round 12b ran them at 4), then one layer's append for both
# caches at 8 warps (bench_append.py, the JSON now written after every row; rounds 12b and 12c ran
# out of time before writing it).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round12d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round12d_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round12d_gpu_tests.txt"
timeout "${TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider -m "" -rA \
  tests/test_cache_update.py >> "$OUT/round12d_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round12d_gpu_tests.txt" | tail -3 | tee -a "$LOG"
timeout "${APPEND_S:-200}" $PY benchmarks/bench_append.py --out "$OUT" --tag h200_round12d \
  --warps 8 --reps 5 > /tmp/append.txt 2>&1
echo "append rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^(innerq|recommended) " /tmp/append.txt | tail -8 | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 13, third H200 call: the cache-write kernel's and the exact bf16 rounding's GPU tests
# at the current code (round 12's last change, two exact conversions per kernel, had not
# run there), one layer's append per variant with its JSON (bytes moved, roofline), and
# the full suite's last shape (SmolLM2 B 8 / 8k), cut by round13b's time limit.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round13c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round13c_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round13c_gpu_tests.txt"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m "" -rA \
  tests/test_cache_update.py tests/test_quant.py >> "$OUT/round13c_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round13c_gpu_tests.txt" | tail -3 | tee -a "$LOG"
timeout "${APPEND_S:-200}" $PY benchmarks/bench_append.py --out "$OUT" --tag h200_round13 \
  --reps 5 > "$OUT/append_h200_round13_log.txt" 2>&1
echo "append rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^(innerq|recommended) " "$OUT/append_h200_round13_log.txt" | tail -8 | tee -a "$LOG"
S='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
kernel_points _round13_smollm2 "[[8, 8192, $S, [\"bf16_pallas\", \"innerq_fused\",
  \"innerq_mgpu\", \"outerq_fused\", \"cfg_fused\"]]]" "${BENCH_S:-150}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

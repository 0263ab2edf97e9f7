#!/usr/bin/env bash
# Round 12, one H200 call: the flush groups quantized inside the cache-write kernel (an
# append is one launch per layer). First the kernel's GPU tests (compiled: the layer
# against XLA's scatters, the group against XLA's quantize_tokens, in place) and the
# quantization tests on the GPU's XLA; then the Llama-3-8B shape at B 8 / 32k with the
# append in one launch (writer auto) against the append of round 11 (writer pallas-rows:
# the groups quantized by XLA, then the write kernel), in one process:
#   a) a profile of one call per step (device busy time, kernels per step, by op);
#   b) one call per step and 20 greedy steps per call (DecodeStep.greedy), bf16 beside;
#   c) the recommended cache, the same two ways.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round12.sh
# (Its shell helpers moved to gpu_env.sh after the run: e2e_rows, profile_summary; the
# commands they run are the same.)
source benchmarks/gpu_env.sh
LOG="$OUT/round12_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

head -2 "$LOG" > "$OUT/round12_gpu_tests.txt"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m "" -rA \
  tests/test_cache_update.py tests/test_quant.py >> "$OUT/round12_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round12_gpu_tests.txt" | tail -3 | tee -a "$LOG"

e2e_rows 12a "${A_S:-110}" "$OUT/e2e_h200_round12_log.txt" \
  --only innerq2:8 --writers auto,pallas-rows --call bound --profile \
  --steps 10 --budget-s 90
profile_summary "$OUT/e2e_h200_round12a.json" 12
rm -rf "$OUT/traces" "$OUT/e2e_h200_round12a.png"
e2e_rows 12b "${B_S:-200}" "$OUT/e2e_h200_round12_log.txt" \
  --only innerq2:8,bf16:8 --writers auto,pallas-rows --call bound,loop \
  --steps 20 --budget-s 180
e2e_rows 12c "${C_S:-100}" "$OUT/e2e_h200_round12_log.txt" \
  --only recommended:8 --call bound,loop --steps 20 --budget-s 80
rm -f "$OUT/e2e_h200_round12c.png"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

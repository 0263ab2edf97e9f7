#!/usr/bin/env bash
# Round 14, first H200 call: the records round 13 left open. The compiled Mosaic op under
# jax.vmap (tests/test_vmap.py's GPU test) and the wgmma="inline" chains on the test grid at
# the current code; then the end-to-end step the issue asks to rerun once the kernel has
# landed (Llama-3-8B shape, random weights, B 8 / 32k: InnerQ, the recommended cache and bf16,
# one call per step and 20 greedy steps per call), and a profile of InnerQ's step.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

head -2 "$LOG" > "$OUT/round14_gpu_tests.txt"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_vmap.py \
  tests/test_mgpu_kernels.py -k "vmap or over_queries or (equals_reference and inline)" \
  >> "$OUT/round14_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round14_gpu_tests.txt" | tail -2 | tee -a "$LOG"

e2e_rows 14a "${A_S:-200}" "$OUT/e2e_h200_round14_log.txt" \
  --only innerq2:8,recommended:8,bf16:8 --call bound,loop --steps 20 --budget-s 180
e2e_rows 14b "${B_S:-90}" "$OUT/e2e_h200_round14_log.txt" \
  --only innerq2:8 --call bound --profile --steps 10 --budget-s 70
profile_summary "$OUT/e2e_h200_round14b.json"
rm -rf "$OUT/traces" "$OUT/e2e_h200_round14b.png"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

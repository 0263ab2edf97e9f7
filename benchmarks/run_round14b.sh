#!/usr/bin/env bash
# Round 14, second H200 call: the end-to-end step the issue asks to rerun once the kernel
# has landed (Llama-3-8B shape, random weights, B 8 / 32k: InnerQ, the recommended cache and
# bf16, one call per step and 20 greedy steps per call), and a profile of InnerQ's step.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
e2e_rows 14a "${A_S:-200}" "$OUT/e2e_h200_round14_log.txt" \
  --only innerq2:8,recommended:8,bf16:8 --call bound,loop --steps 20 --budget-s 180
e2e_rows 14b "${B_S:-90}" "$OUT/e2e_h200_round14_log.txt" \
  --only innerq2:8 --call bound --profile --steps 10 --budget-s 70
profile_summary "$OUT/e2e_h200_round14b.json"
rm -rf "$OUT/traces" "$OUT/e2e_h200_round14b.png"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

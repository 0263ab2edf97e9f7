#!/usr/bin/env bash
# Round 17, second H200 call: one stream at a 128k context end to end (bench_e2e.py --suite
# long: Llama-3-8B shape, random weights; the bf16 cache as large as the weights), where the
# dispatch's round-16 rule runs the Mosaic op: bf16, InnerQ, the recommended cache and
# OuterQ, one call per step and 20 greedy steps per call.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round17b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round17b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
e2e_rows 17long "${E2E_S:-540}" "$OUT/e2e_h200_round17long_log.txt" --suite long \
  --call bound,loop --steps 20 --budget-s 480
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 20e (one H200 call): one-token projections as two-row matmuls (INNERQ_MATVEC_ROWS=2:
# the token and a zero row, so XLA keeps each a matmul instead of a multiply + reduce) against
# the default, on the default model's shape at B 1 / 1k (bf16, InnerQ; device loop and one
# call per step).
# The option was measured, found level or slower, and removed: run this at commit a3875b0.
# Usage (repository root, on the GPU machine, at a3875b0): COMMIT=a3875b0 bash benchmarks/run_round20e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round20e_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
for rows in 1 2; do
  INNERQ_MATVEC_ROWS=$rows e2e_rows "20e_rows$rows" "${ROWS_S:-110}" \
    "$OUT/e2e_h200_round20e_rows${rows}_log.txt" --model smollm2 --suite cli \
    --only bf16:1,innerq2:1 --call loop,bound --steps 20 --budget-s 90
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

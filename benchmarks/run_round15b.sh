#!/usr/bin/env bash
# Round 15, second H200 call: the end-to-end step with OuterQ on the Mosaic kernel (the
# dispatch's choice at B 8 / 32k since round 14) beside InnerQ and bf16 (Llama-3-8B shape,
# random weights, one call per step and 20 greedy steps per call), then the two target
# shapes at the final kernel commit with every GPU peer (each point checked first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
e2e_rows 15a "${A_S:-220}" "$OUT/e2e_h200_round15_log.txt" \
  --only innerq2:8,outerq2:8,bf16:8 --call bound,loop --steps 20 --budget-s 200
unset XLA_PYTHON_CLIENT_MEM_FRACTION
V='["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu", "outerq_fused", "outerq_mgpu",
  "innerq-h_fused"]'
kernel_points _round15_final "[[8, 32768, {}, $V], [1, 131072, {}, $V]]" "${BENCH_S:-300}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

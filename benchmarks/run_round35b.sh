#!/usr/bin/env bash
# Round 35, second call: the whole GPU record at the final library code (every -m gpu test),
# then the two target shapes with every peer and kernel in one process (the Mosaic kernel
# with the exact maximum beside the default), then the same shapes by device time (traced).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round35b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round35b_log.txt"
start_log "$LOG"
record_and_targets round35b '["cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "innerq_mgpu@{\"rescale\": \"block\"}", "cfg_fused", "innerq-h_fused", "outerq_mgpu"]'
OPTS='{"ops": ["innerq_dispatch", "cudnn", "bf16_pallas"], "inputs": ["rotating"]}'
trace_suite _round35b "[[8, 32768, {}], [1, 131072, {}]]" "$OPTS" "${TRACE_S:-110}"
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

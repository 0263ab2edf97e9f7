#!/usr/bin/env bash
# Round 34, third call: the whole GPU record with rescale="lazy" as the H200's default (every
# -m gpu test), then the two target shapes with every peer and kernel in one process, the
# Mosaic kernel with the exact maximum (rescale="block") beside it (bench_kernels' points
# suite, each point checked against its reference first). (Run at 51bfe83 with these steps
# written out; gpu_env.sh's record_and_targets holds them since.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34c_log.txt"
start_log "$LOG"
record_and_targets round34c '["cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "innerq_mgpu@{\"rescale\": \"block\"}", "cfg_fused", "innerq-h_fused", "outerq_mgpu"]'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

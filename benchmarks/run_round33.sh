#!/usr/bin/env bash
# Round 33, first H200 call: the whole GPU record at the final library code (every -m gpu
# test), then the two target shapes with every peer and kernel in one process (bench_kernels'
# points suite, each point checked against its reference first). (Run at 585e122 / 8b9dfb6
# with these steps written out; gpu_env.sh's record_and_targets holds them since.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33_log.txt"
start_log "$LOG"
record_and_targets round33 '["cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused", "innerq-h_fused", "outerq_fused", "outerq_mgpu", "innerq_mgpu@{\"key_format\": \"e4m3x2\"}"]'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

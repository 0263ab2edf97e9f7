#!/usr/bin/env bash
# Round 33, first H200 call: the whole GPU record at the final library code (every -m gpu
# test), then the two target shapes with every peer and kernel in one process (bench_kernels'
# points suite, each point checked against its reference first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33_log.txt"
start_log "$LOG"
[ "${SKIP_TESTS:-0}" = 1 ] || every_gpu_test "$OUT/round33_gpu_tests.txt" 300
V='["cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused", "innerq-h_fused", "outerq_fused", "outerq_mgpu", "innerq_mgpu@{\"key_format\": \"e4m3x2\"}"]'
DEFAULT_POINTS="[[8, 32768, {}, $V], [1, 131072, {}, $V]]"
kernel_points _round33 "${POINTS:-$DEFAULT_POINTS}" "${BENCH_S:-240}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 34, third call: the whole GPU record with rescale="lazy" as the H200's default (every
# -m gpu test), then the two target shapes with every peer and kernel in one process, the
# Mosaic kernel with the exact maximum (rescale="block") beside it (bench_kernels' points
# suite, each point checked against its reference first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34c_log.txt"
start_log "$LOG"
[ "${SKIP_TESTS:-0}" = 1 ] || every_gpu_test "$OUT/round34c_gpu_tests.txt" 300
V='["cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "innerq_mgpu@{\"rescale\": \"block\"}", "cfg_fused", "innerq-h_fused", "outerq_mgpu"]'
DEFAULT_POINTS="[[8, 32768, {}, $V], [1, 131072, {}, $V]]"
kernel_points _round34c "${POINTS:-$DEFAULT_POINTS}" "${BENCH_S:-240}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

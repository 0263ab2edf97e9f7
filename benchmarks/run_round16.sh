#!/usr/bin/env bash
# Round 16, first H200 call: the merge-only launch as fixed in round 15 (every column weighted
# by its head's first column's running max) on the GPU grid, with vmap and the dispatch
# tests; then the Mosaic op and the fused Triton op timed in one process over the shapes
# the dispatch rule splits (B 1 at 8k-128k, B 2 / 64k, B 4 / 32k, B 8 / 8k), InnerQ and
# OuterQ, beside jax's bf16 kernel, every point checked against its reference first and
# warmed up before it is timed (WARM_S); last, B 1 / 4k in two orders (the warm-up's check).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round16.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round16_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round16_gpu_tests.txt" "${TESTS_S:-110}" tests/test_mgpu_kernels.py \
  tests/test_vmap.py -k "(equals_reference and kernel-merge) or dispatch or vmap"
I='["bf16_pallas", "innerq_fused", "innerq_mgpu"]'
IO='["bf16_pallas", "innerq_fused", "innerq_mgpu", "outerq_fused", "outerq_mgpu"]'
kernel_points _round16_dispatch "[[1, 131072, {}, $IO], [1, 65536, {}, $IO],
  [1, 32768, {}, $I], [1, 16384, {}, $IO], [1, 8192, {}, $I], [2, 65536, {}, $I],
  [4, 32768, {}, $IO], [8, 8192, {}, $I]]" "${BENCH_S:-330}"
kernel_points _round16_order '[[1, 4096, {}, ["bf16_pallas", "cfg_fused", "innerq_fused"]],
  [1, 4096, {}, ["innerq_fused", "cfg_fused", "bf16_pallas"]]]' "${ORDER_S:-80}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

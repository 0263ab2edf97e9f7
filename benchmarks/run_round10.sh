#!/usr/bin/env bash
# Round 10, first H200 call: the query's preparation and the output's finish inside the
# kernels (pallas_kernels/query_prep.py). GPU tests compiled: the Mosaic op's tuned default
# on the whole grid at the current kernel code, and the dispatch's form of the call (the
# model's bf16 query in, its output back) on the Mosaic op and on the fused Triton kernel;
# then the shape points with the dispatch as it is now (cfg_fused) beside the same kernels
# with q prepared and the output finished in XLA around them (cfg_xlaprep, the dispatch
# before), for the paper's InnerQ and the recommended cache, beside jax's bf16 kernel.
# Every point checked against the reference first; pipelined timing.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round10.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round10_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/round10_mosaic_gpu_tests.txt" "epilogue-query or prepares" \
  "${TESTS_S:-150}"

triton_gpu_tests "$OUT/round10_triton_gpu_tests.txt" "prepares_and_finishes or model_output" "${TRITON_S:-120}"

REC='{\"rotation\": \"keys_values\", \"sink\": 36, \"recent\": 96}'
V="[\"bf16_pallas\", \"innerq_fused\", \"cfg_fused\", \"cfg_xlaprep\", \"cfg_fused@$REC\",
    \"cfg_xlaprep@$REC\"]"
kernel_points _round10 "[[1, 4096, {}, $V], [8, 4096, {}, $V], [1, 32768, {}, $V],
  [8, 32768, {}, $V], [1, 131072, {}, $V]]" "${BENCH_S:-330}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

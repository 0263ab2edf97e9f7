#!/usr/bin/env bash
# Round 9, third H200 call: the tuned default (tail="mask", windows="epilogue", wide copies,
# query kernel) on the recommended cache compiled (GPU test), then the two target shapes
# with every op a user can pick beside jax's bf16 kernel: the fused Triton op, OuterQ's,
# the Mosaic op, and through the dispatch (query preparation and rotations included) the
# paper's InnerQ, InnerQ-H and the recommended cache (InnerQ-H, 36 sinks, 96 recent); and
# B 1 / 4k, the one shape where InnerQ trailed bf16. Every point checked first; pipelined.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round9c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round9c_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/round9c_gpu_tests.txt" "epilogue-query and recommended" "${TESTS_S:-90}"

REC='cfg_fused@{\"rotation\": \"keys_values\", \"sink\": 36, \"recent\": 96}'
V="[\"bf16_pallas\", \"innerq_fused\", \"outerq_fused\", \"innerq_mgpu\", \"cfg_fused\",
    \"innerq-h_fused\", \"$REC\"]"
S='["bf16_pallas", "innerq_fused", "cfg_fused"]'
kernel_points _round9 "[[8, 32768, {}, $V], [1, 131072, {}, $V], [1, 4096, {}, $S]]" \
  "${BENCH_S:-400}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

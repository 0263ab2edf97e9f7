#!/usr/bin/env bash
# Round 30c: InnerQ-H against InnerQ as a bf16 model calls them (its query heads in bf16),
# through the dispatch at B 8 / 32k and B 1 / 128k: InnerQ-H as generate runs it (the value
# rotation folded into the weights, so the cache rotates keys only) and as a standalone op
# (keys and values rotated), beside InnerQ and the bf16 peers; the same points twice, for
# the spread between passes.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round30c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round30c_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
Q='\"query_dtype\": \"bfloat16\"'
V="\"bf16_pallas\", \"cudnn\", \"cfg_fused@{$Q}\", \"cfg_fused@{$Q, \\\"rotation\\\": \\\"keys\\\"}\", \"cfg_fused@{$Q, \\\"rotation\\\": \\\"keys_values\\\"}\""
P="[[8, 32768, {}, [$V]], [1, 131072, {}, [$V]]]"
kernel_points 30c1 "$P" "${PASS_S:-150}"
kernel_points 30c2 "$P" "${PASS_S:-150}"
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

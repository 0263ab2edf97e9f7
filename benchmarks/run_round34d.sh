#!/usr/bin/env bash
# Round 34, fourth call: with rescale="lazy" the H200's default, the two target shapes by
# device time (trace suite: the dispatch beside cuDNN and jax's Pallas kernel), then the other
# shapes of the suite that run the Mosaic kernel (B 32 / 16k, B 8 / 16k, 4 bits, G 64, MHA),
# the Mosaic op with the exact maximum beside the default (bench_kernels' points suite, each
# point checked against its reference first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34d_log.txt"
start_log "$LOG"
OPTS='{"ops": ["innerq_dispatch", "cudnn", "bf16_pallas"], "inputs": ["rotating"]}'
trace_suite _round34d "[[8, 32768, {}], [1, 131072, {}]]" "$OPTS" "${TRACE_S:-110}"
rm -rf "$OUT/traces"
R='"cudnn", "bf16_pallas", "innerq_mgpu", "innerq_mgpu@{\"rescale\": \"block\"}", "cfg_fused"'
P="[[32, 16384, {}, [$R]], [8, 16384, {}, [$R]], [8, 32768, {\"bits\": 4}, [$R]],
  [8, 32768, {\"G\": 64}, [$R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, [$R]]]"
kernel_points _round34d_rest "${POINTS:-$P}" "${BENCH_S:-250}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

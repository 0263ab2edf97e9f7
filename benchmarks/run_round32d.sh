#!/usr/bin/env bash
# Round 32, fourth H200 call: the e4m3 keys beside the bf16 peers in one process (bench_kernels'
# points suite: cuDNN, jax's Pallas kernel, the Mosaic op with bf16 keys and with e4m3 keys),
# at B 8 / 32k and B 1 / 128k, each point checked against its reference first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round32d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32d_log.txt"
start_log "$LOG"
cat > /tmp/points.json <<'JSON'
[[8, 32768, {}, ["cudnn", "bf16_pallas", "innerq_mgpu", "innerq_mgpu@{\"key_format\": \"e4m3x2\"}"]],
 [1, 131072, {}, ["cudnn", "bf16_pallas", "innerq_mgpu", "innerq_mgpu@{\"key_format\": \"e4m3x2\"}"]]]
JSON
kernel_points _round32d "${POINTS:-$(cat /tmp/points.json)}" "${BENCH_S:-400}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 33, third H200 call (run as one command line on the warm machine; this file is that
# line): the shape suite's last shape, which run_round33b.sh's limit cut, and B 1 / 4k again
# with its variants in the opposite order.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33c_log.txt"
start_log "$LOG"
R='"cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused", "outerq_fused"'
P="[[8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"}, [$R]],
  [1, 4096, {}, [\"cfg_fused\", \"innerq_fused\", \"cudnn\", \"bf16_pallas\"]]]"
kernel_points _round33_smollm2 "${POINTS:-$P}" "${BENCH_S:-150}"

#!/usr/bin/env bash
# Round 34, first profile call: Nsight Compute on the final Mosaic GPU kernel at B 8 / 32k
# (bf16 keys, the default, and the e4m3 keys), one launch each, then ncu_summary.py: the
# main loop's instructions per warp and block and its warp-state samples by instruction
# class and stall reason (round 5 was the last profile; rounds 8-13 changed the loop).
# (Run at 1cdce99 with these steps written out; gpu_env.sh's ncu_loop holds them since.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34_log.txt"
start_log "$LOG"
ncu_loop round34_bf16keys '{}'
ncu_loop round34_e4m3keys '{"key_format": "e4m3x2"}'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 32, third H200 call: the whole GPU record at the round's final library code (every
# -m gpu test), and the default (bf16 keys) build's registers and SASS mix beside the e4m3
# build's of run_round32.sh.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round32c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32c_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round32c_gpu_tests.txt" 300
mosaic_sass "$OUT/round32c_sass_bf16.log.gz" '[{}]'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

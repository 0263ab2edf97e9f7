#!/usr/bin/env bash
# Round 32, sixth H200 call: the GPU tests of the e4m3 keys and the default kernel's tuned
# variant on every grid case, at the round's final library code (after the review's two
# extractions, whose calls were checked equal on the CPU).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round32f.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32f_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round32f_gpu_tests.txt" "e4m3 or (gpu_kernel_equals_reference and epilogue-query)" 170
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

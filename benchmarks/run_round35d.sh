#!/usr/bin/env bash
# Round 35, fourth call: after the review's refactor (the InnerQ softmax step owns the whole
# online-softmax update in both maxima; the lazy kernel's IR unchanged, the exact maximum's
# changed: its multiply by alpha moved from the value epilogue into the softmax step), the
# exact maximum ("block-max" variant, which no tuned H200 default runs) on the GPU grid,
# and its SASS (registers, spills).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round35d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round35d_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round35d_gpu_tests.txt" "test_gpu_kernel_equals_reference and block" 200
mosaic_sass "$OUT/round35d_sass_block.log.gz" '[{"rescale": "block"}]'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

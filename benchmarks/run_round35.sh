#!/usr/bin/env bash
# Round 35, first call: the lazy maximum's common side with no multiply by alpha (the output
# and sums pass through the softmax step's branch, multiplied only on its rare side). Its GPU
# tests on the whole grid, its SASS (registers: more than 168 would drop a program per SM),
# the op and the kernel alone beside the exact maximum ("block") in alternation, as round
# 34b timed them (lazy then -2.8% kernel, -3.9% op at B 8 / 32k); then round 30c's passes
# (InnerQ-H as a bf16 model calls it) at this code.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round35.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round35_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round35_gpu_tests.txt" "(test_gpu_kernel_equals_reference and lazy) or test_gpu_dispatch_runs_the_tuned" 200
mosaic_sass "$OUT/round35_sass_lazy.log.gz" '[{"rescale": "lazy"}]'
mosaic_probe _round35 '[{"rescale": "block"}, {"rescale": "lazy"}, {"rescale": "lazy"}, {"rescale": "block"}]' 240
echo "== round 30c's passes at this code" | tee -a "$LOG"
PASS_S=110 bash benchmarks/run_round30c.sh  # (committed as *_round35_30c*: renamed so as not to overwrite round 30c)
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

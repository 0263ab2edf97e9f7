#!/usr/bin/env bash
# Round 34, second call: the lazy running maximum (rescale="lazy": the block's probabilities
# against the kept maximum, the exact reduction only where a score passes it by
# mgpu_block.LAZY_RESCALE). Its GPU tests on the whole grid, its SASS (registers: a fourth
# program per SM needs <= 128, more than 168 would drop to two), the op and the kernel alone
# at B 8 / 32k and B 1 / 128k beside the default in alternation (every point checked against
# the reference first), then its loop under Nsight Compute (ncu_summary.py, as run_round34.sh).
# (Run at 0a33d85 with the profile's steps written out; gpu_env.sh's ncu_loop holds them since.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34b_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round34b_gpu_tests.txt" "test_gpu_kernel_equals_reference and lazy" 200
mosaic_sass "$OUT/round34b_sass_lazy.log.gz" '[{"rescale": "lazy"}]'
mosaic_probe _round34b '[{}, {"rescale": "lazy"}, {"rescale": "lazy"}, {}]' 240
ncu_loop round34b_lazy '{"rescale": "lazy"}' \
  "--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section SourceCounters --section InstructionStats"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

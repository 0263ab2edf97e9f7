#!/usr/bin/env bash
# Round 32, fifth H200 call: e4m3 value operands (value_format="e4m3x2": the value codes four per
# register against the probabilities' e4m3 hi and lo tiles), alone and with the e4m3 keys.
# The op and the kernel alone at B 8 / 32k and B 1 / 128k beside the bf16 default (every
# point checked against the reference first), both builds' registers and SASS mix, then the
# GPU tests (2-bit grid: keys, values, both and bf16 on the same inputs).
# Ran at 2c1d0dc; the option was taken out after this call (over the tolerance at the long
# shapes: benchmarks/KERNEL_NOTES.md, "Round 32"), so the script needs that commit.
# Usage (repository root, on the GPU machine): COMMIT=2c1d0dc bash benchmarks/run_round32e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32e_log.txt"
start_log "$LOG"
mosaic_probe _round32e '[{}, {"value_format": "e4m3x2"},
  {"key_format": "e4m3x2", "value_format": "e4m3x2"}, {}]' 240
mosaic_sass "$OUT/round32e_sass_values.log.gz" '[{"value_format": "e4m3x2"}]'
mosaic_sass "$OUT/round32e_sass_both.log.gz" '[{"key_format": "e4m3x2", "value_format": "e4m3x2"}]'
mosaic_gpu_tests "$OUT/round32e_gpu_tests.txt" e4m3 200
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

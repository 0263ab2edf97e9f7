#!/usr/bin/env bash
# Round 32, first H200 call: the Mosaic kernel with e4m3 key operands (key_format="e4m3x2")
# beside the bf16 ones. The op and the kernel alone at B 8 / 32k and B 1 / 128k (every point
# checked against the reference first; the e4m3 keys take their query operands from XLA,
# so the bf16 keys are timed both ways), the e4m3 build's registers and SASS mix, then the
# GPU tests of the e4m3 keys (2-bit grid, each beside the bf16 keys' error).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round32.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32_log.txt"
start_log "$LOG"
mosaic_probe _round32 '[{"query": "xla"}, {"key_format": "e4m3x2"}, {},
  {"key_format": "e4m3x2", "chain_parts": 2}]' 300
mosaic_sass "$OUT/round32_sass_e4m3.log.gz" '[{"key_format": "e4m3x2"}]'
mosaic_gpu_tests "$OUT/round32_gpu_tests.txt" e4m3 200
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

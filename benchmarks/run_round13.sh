#!/usr/bin/env bash
# Round 13, first H200 call: the Mosaic kernel's chains as one inline block each (one fence,
# one commit, B descriptors rebuilt per block from one base: wgmma="inline") and the value
# scales of groups past a block's valid tokens zeroed by one select per word. SASS of the
# default and the inline chains, the GPU tests of both on the grid, then the kernel-alone
# and op timings of both pipelines with both chains at B 8 / 32k and B 1 / 128k.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round13.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round13_log.txt"
start_log "$LOG"
mosaic_sass "$OUT/round13_sass.log.gz" '[{}, {"wgmma": "inline"}]'
mosaic_gpu_tests "$OUT/round13_gpu_tests.txt" \
  "(equals_reference and (epilogue-query or inline)) or prepares" "${TESTS_S:-220}"
mosaic_probe _round13 '[{}, {"wgmma": "inline"}, {"pipeline": "bulk"},
  {"pipeline": "bulk", "wgmma": "inline"}]' "${PROBE_S:-220}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

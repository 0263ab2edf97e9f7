#!/usr/bin/env bash
# Round 9, fifth H200 call: the wgmma chains in parts (chain_parts 2 and 4: each part's A
# operands unpacked and waited for alone, fewer registers live), aimed at four programs
# per SM (<= 128 registers; three stages of copies then fit the shared memory): the
# registers ptxas gives each, GPU tests of chain2 on three grid cases, and kernel-only and
# op timings beside the default at B 8 / 32k and B 1 / 128k.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round9e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round9e_log.txt"
start_log "$LOG"

mosaic_sass "$OUT/round9e_sass.log.gz" '[{"chain_parts": 2}, {"chain_parts": 4}]'
mosaic_gpu_tests "$OUT/round9e_gpu_tests.txt" \
  "chain2 and (G32-D128-gqa4 or smollm or recommended)" "${TESTS_S:-70}"

P='[{}, {"chain_parts": 2}, {"chain_parts": 2, "num_stages": 3, "ctas_per_sm": 4},
    {"chain_parts": 4, "num_stages": 3, "ctas_per_sm": 4}]'
mosaic_probe _round9e "$P" "${PROBE_S:-220}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

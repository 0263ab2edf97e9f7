#!/usr/bin/env bash
# Round 9, second H200 call. The first (run_round9.sh) found that zeroing the last block's
# value scales under a branch raised the kernel to 176 registers (2 programs per SM instead
# of 3; B 8 / 32k kernel 0.113 -> 0.161 ms). Now the per-block mask is back as the default
# (tail="mask") and the zeroing is an option without a branch (tail="zero": stores
# predicated off but in a program's last block, inside the softmax step). This call: GPU
# tests of tail-zero and kernel-merge on the whole grid, registers and SASS of both tails,
# kernel-only and op timings of the four (tail, windows) points at B 8 / 32k and B 1 / 128k.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round9b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round9b_log.txt"
start_log "$LOG"

mosaic_sass "$OUT/round9b_sass.log.gz" '[{}, {"tail": "zero"}]'
mosaic_gpu_tests "$OUT/round9b_gpu_tests.txt" "tail-zero or kernel-merge" "${TESTS_S:-200}"

P='[{"windows": "epilogue", "wide_copies": true, "query": "kernel", "tail": "mask"},
    {"windows": "kernel", "wide_copies": true, "query": "kernel", "tail": "mask"},
    {"windows": "epilogue", "wide_copies": true, "query": "kernel", "tail": "zero"},
    {"windows": "kernel", "wide_copies": true, "query": "kernel", "tail": "zero"}]'
mosaic_probe _round9b "$P" "${PROBE_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 32, second H200 call: the e4m3 keys with their query operands in the Triton query
# kernel (one launch, as the bf16 keys' default). The GPU tests of the e4m3 keys (each beside
# the bf16 keys' error), then the op and the kernel alone at B 8 / 32k and B 1 / 128k, the
# two key formats alternated twice (every point checked against the reference first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round32b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round32b_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round32b_gpu_tests.txt" e4m3 200
mosaic_probe _round32b '[{}, {"key_format": "e4m3x2"}, {"key_format": "e4m3x2"}, {}]' 300
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

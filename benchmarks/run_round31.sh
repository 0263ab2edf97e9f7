#!/usr/bin/env bash
# Round 31, first H200 call: the whole kernel suite (bench_kernels.py --suite full) at the
# final kernels (library code as at 82b7ab1, whose GPU record is round29c_gpu_tests.txt): every
# peer and variant at B 8 / 32k and B 1 / 128k, then the other shapes of docs/benchmarks.md,
# every point warmed up and checked against its reference first. A suite the limit cuts is
# completed by run_round31b.sh and bench_kernels.py --merge.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round31.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round31_log.txt"
start_log "$LOG"
kernel_suite _round31 "${SUITE_S:-560}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

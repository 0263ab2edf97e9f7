#!/usr/bin/env bash
# Round 16, second H200 call: the whole kernel suite (bench_kernels.py --suite full) at the
# final kernel and epilogue, with the dispatch's own rows (cfg_fused) at every shape and its
# new rule (min_pair_tokens), every point warmed up and checked against its reference first.
# A cut suite is completed by run_round16c.sh and bench_kernels.py --merge.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round16b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round16b_log.txt"
start_log "$LOG"
kernel_suite _round16 "${SUITE_S:-575}"

#!/usr/bin/env bash
# Round 10, third H200 call: at short contexts (B 1 / 4k, B 8 / 4k) the fused Triton op's
# split count (programs per (sequence, kv head)), beside the dispatch and jax's bf16 kernel,
# B 1 / 4k twice over (run to run spread). Every point checked against the reference first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round10c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round10c_log.txt"
start_log "$LOG"
V='["bf16_pallas", "cfg_fused", "innerq_fused@{\"num_splits\": 4}",
    "innerq_fused@{\"num_splits\": 8}", "innerq_fused@{\"num_splits\": 16}",
    "innerq_fused@{\"num_splits\": 32}"]'
kernel_points _round10c "[[1, 4096, {}, $V], [8, 4096, {}, $V], [1, 4096, {}, $V]]" "${BENCH_S:-240}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

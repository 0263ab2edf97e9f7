#!/usr/bin/env bash
# Round 13, fourth H200 call (the session's last device seconds): the short-context shapes
# through the dispatch (cfg_fused: what a model layer runs) beside jax's bf16 kernel, the
# rows "no shape slower than bf16" is decided on; each checked against the reference first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round13d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round13d_log.txt"
start_log "$LOG"
V='["bf16_pallas", "cfg_fused"]'
kernel_points _round13_short "[[1, 4096, {}, $V], [8, 4096, {}, $V], [1, 32768, {}, $V]]" \
  "${BENCH_S:-160}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

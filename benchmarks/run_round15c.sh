#!/usr/bin/env bash
# Round 15, third H200 call: the short shapes again with the points in another order (the
# first call's B 1 / 4k rows moved by up to 40% with their place in the run): the dispatch,
# jax's bf16 kernel and the fused Triton kernel's two tunables that looked faster there, at
# B 1 / 4k and at SmolLM2's shape, every point checked first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15c_log.txt"
start_log "$LOG"
kernel_points _round15_short2 '[[1, 4096, {}, ["cfg_fused", "bf16_pallas",
  "innerq_fused@{\"num_warps\": 8}", "innerq_fused", "innerq_fused@{\"window_rows\": 128}",
  "innerq_fused@{\"num_warps\": 8, \"window_rows\": 128}"]],
  [8, 8192, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"},
  ["cfg_fused", "bf16_pallas", "innerq_fused", "innerq_fused@{\"num_warps\": 8}",
  "innerq_fused@{\"window_rows\": 128}"]]]' "${BENCH_S:-200}"

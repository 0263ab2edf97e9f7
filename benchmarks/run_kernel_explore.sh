#!/usr/bin/env bash
# One device call: the MMA-path and split-count experiments of KERNEL_NOTES.md
# ("Round 3"). Every point is checked against the reference before timing.
#   bash benchmarks/run_kernel_explore.sh     (on the GPU machine; results in $OUT)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
big='"bf16_pallas", "cudnn", "innerq_fused",
  "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0}",
  "innerq_fused@{\"num_warps\": 2, \"max_registers\": 168}",
  "innerq_fused@{\"num_warps\": 2, \"max_registers\": 128}",
  "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0, \"num_stages\": 4}",
  "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0, \"block_tokens\": 256}",
  "outerq_fused", "outerq_fused@{\"num_warps\": 2, \"max_registers\": 0}",
  "outerq_fused@{\"num_warps\": 2, \"max_registers\": 168}"'
timeout 260 python3 benchmarks/bench_kernels.py --suite points --tag _warps --out "$OUT" --reps 5 \
  --points "[[8, 32768, {}, [$big]], [1, 131072, {}, [$big]]]" 2>&1 | tee "$OUT/kernels_points_warps.log"
# Triton's own switch for mma.sync instead of wgmma (process-wide, read when XLA compiles)
v2='"bf16_pallas", "innerq_fused", "innerq_fused@{\"max_registers\": 0}",
  "innerq_fused@{\"block_tokens\": 256, \"num_warps\": 8, \"max_registers\": 0}",
  "outerq_fused@{\"max_registers\": 0}"'
DISABLE_MMA_V3=1 timeout 130 python3 benchmarks/bench_kernels.py --suite points --tag _mmav2 --out "$OUT" --reps 5 \
  --points "[[8, 32768, {}, [$v2]], [1, 131072, {}, [$v2]]]" 2>&1 | tee "$OUT/kernels_points_mmav2.log"
short='[[1, 4096, {}, ["bf16_pallas", "innerq_fused", "innerq_fused@{\"num_splits\": 4}",
    "innerq_fused@{\"num_splits\": 8}", "innerq_fused@{\"num_splits\": 16}",
    "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0, \"num_splits\": 8}"]],
  [1, 32768, {}, ["bf16_pallas", "innerq_fused", "innerq_fused@{\"num_splits\": 16}",
    "innerq_fused@{\"num_splits\": 33}", "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0}"]],
  [8, 4096, {}, ["bf16_pallas", "innerq_fused", "innerq_fused@{\"num_splits\": 2}",
    "innerq_fused@{\"num_splits\": 4}", "innerq_fused@{\"num_warps\": 2, \"max_registers\": 0}"]]]'
timeout 150 python3 benchmarks/bench_kernels.py --suite points --tag _short --out "$OUT" --reps 5 \
  --points "$short" 2>&1 | tee "$OUT/kernels_points_short.log"

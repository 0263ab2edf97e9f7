#!/usr/bin/env bash
# Round 9 (one H200 call): the Mosaic GPU kernel with the value scales of a program's last
# block zeroed in shared memory (no per-block mask) and windows="kernel" merged by one
# Triton launch: GPU tests of the default variant and of kernel-merge on the whole grid
# (the recommended InnerQ-H cache included), the SASS counts, kernel-only and op timings
# of both at B 8 / 32k and B 1 / 128k, and why the Triton kernel's interpret mode misses
# 1e-2 on a GPU (benchmarks/interpret_gpu_check.py).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round9.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round9_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/round9_gpu_tests.txt" "epilogue-query or kernel-merge" "${TESTS_S:-250}"
mosaic_sass "$OUT/round9_sass.log.gz"

P='[{"windows": "epilogue", "wide_copies": true, "query": "kernel"},
    {"windows": "kernel", "wide_copies": true, "query": "kernel"}]'
mosaic_probe _round9 "$P" "${PROBE_S:-150}"

echo "== interpret mode on the GPU" | tee -a "$LOG"
timeout 90 $PY benchmarks/interpret_gpu_check.py 2>&1 | grep -vE "^\s*(File|warn)" | tail -12 \
  | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 14, sixth H200 call: whether the dispatch should run OuterQ on the Mosaic kernel.
# The OuterQ Mosaic op and the Triton OuterQ op side by side in one process over the shapes
# the InnerQ rule was decided on (every point checked against the reference first), and
# the OuterQ Mosaic op as the dispatch calls it (the model's bf16 query heads in, q'
# prepared by XLA, bf16 out) against the reference, compiled.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14f.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14f_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round14f_gpu_tests.txt"
timeout "${TESTS_S:-60}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_mgpu_kernels.py \
  -k "prepares and outerq" >> "$OUT/round14f_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round14f_gpu_tests.txt" | tail -2 | tee -a "$LOG"
V='["outerq_fused", "outerq_mgpu"]'
kernel_points _round14_outer_dispatch "[[8, 32768, {}, $V], [8, 16384, {}, $V],
  [32, 16384, {}, $V], [1, 131072, {}, $V], [1, 32768, {}, $V], [8, 4096, {}, $V]]" \
  "${BENCH_S:-260}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

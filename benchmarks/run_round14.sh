#!/usr/bin/env bash
# Round 14, first H200 call: the Mosaic GPU kernel on the OuterQ layout (each block's key
# scales folded into a Qexp the warpgroup builds, the value scales into Pexp) timed beside
# the InnerQ one, the Triton OuterQ kernel and jax's bf16 kernel at B 8 / 32k and B 1 / 128k
# (every point checked against its reference first); then the compiled tests: the OuterQ
# grid, the Mosaic op under jax.vmap, and the wgmma="inline" chains at the current code.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14_log.txt"
start_log "$LOG"
kernel_points _round14_outer '[[8, 32768, {}, ["bf16_pallas", "innerq_mgpu", "outerq_mgpu",
  "outerq_fused"]], [1, 131072, {}, ["bf16_pallas", "innerq_mgpu", "outerq_mgpu",
  "outerq_fused"]]]' "${BENCH_S:-230}"
head -2 "$LOG" > "$OUT/round14_gpu_tests.txt"
timeout "${TESTS_S:-250}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_vmap.py \
  tests/test_mgpu_kernels.py -k "outer or vmap or over_queries or (equals_reference and inline)" \
  >> "$OUT/round14_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round14_gpu_tests.txt" | tail -2 | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "$OUT/round14_gpu_tests.txt" | head -20 | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

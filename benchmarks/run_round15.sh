#!/usr/bin/env bash
# Round 15, first H200 call: the whole GPU test module at the final kernel commit (every
# -m gpu test: the Mosaic grid in every structural variant, the OuterQ grid, the model's
# query form, the dispatch at a shape it sends to the Mosaic kernel (InnerQ, the
# recommended cache, OuterQ with sinks), vmap, the write kernel), eight pytest workers
# sharing the GPU; then the short shape the dispatch is still behind bf16 at (B 1 / 4k),
# the fused Triton kernel's tunables beside jax's bf16 kernel, every point checked first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round15_gpu_tests.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TESTS_S:-330}" $PY -m pytest -q \
  -p no:cacheprovider -m gpu -rA -n "${WORKERS:-8}" tests/test_mgpu_kernels.py \
  tests/test_vmap.py tests/test_cache_update.py >> "$OUT/round15_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round15_gpu_tests.txt" | tail -2 | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "$OUT/round15_gpu_tests.txt" | head -20 | tee -a "$LOG"
kernel_points _round15_short '[[1, 4096, {}, ["bf16_pallas", "cfg_fused", "innerq_fused",
  "innerq_fused@{\"num_splits\": 8}", "innerq_fused@{\"num_splits\": 32}",
  "innerq_fused@{\"num_warps\": 8}", "innerq_fused@{\"num_stages\": 2}",
  "innerq_fused@{\"window_rows\": 32}", "innerq_fused@{\"window_rows\": 128}"]]]' \
  "${BENCH_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

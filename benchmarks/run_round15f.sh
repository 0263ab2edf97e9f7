#!/usr/bin/env bash
# Round 15, sixth H200 call: the epilogue's merge in the partials' own column order (each
# split's channel block one contiguous tile instead of per-head gathers), compiled: the
# Mosaic op's GPU tests whose epilogue or merge changed (the epilogue and kernel-merge
# variants on the grid, OuterQ, the model's query form, the dispatch, vmap), then the trace
# of the timed op at B 1 / 128k and B 8 / 32k (round15d's is the same op before the change).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15f.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15f_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round15f_gpu_tests.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TESTS_S:-110}" $PY -m pytest -q \
  -p no:cacheprovider -m gpu -rA -n 8 tests/test_mgpu_kernels.py tests/test_vmap.py \
  -k "(equals_reference and (epilogue-query or kernel-merge)) or outer or prepares or dispatch or vmap" \
  >> "$OUT/round15f_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round15f_gpu_tests.txt" | tail -2 | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "$OUT/round15f_gpu_tests.txt" | head -10 | tee -a "$LOG"
timeout "${TRACE_S:-130}" $PY benchmarks/bench_kernels.py --suite trace --tag _round15f \
  --out "$OUT" --reps 5 --options '{"ops": ["innerq_mgpu"]}' \
  --shapes '[[1, 131072, {}], [8, 32768, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 29b (one H200 call): the fused Triton kernel's compiled tests that round 29's limit
# cut (tests/test_kernels.py from test_key_scores_kernel on) and the one that failed there
# (test_split_cases_loop_over_blocks), with their reports.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round29b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round29b_log.txt"
start_log "$LOG"
triton_gpu_tests "$OUT/round29b_triton_gpu_tests.txt" "split_cases_loop or key_scores_kernel \
or value_sum_kernel or rejects_bad or non_finite or missing_jax or interpret_mode_on_a_gpu \
or missing_pallas or dense_bf16 or default_split_count or default_window" "${TRITON_S:-200}" \
  tests/test_kernels.py
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|Error|assert" "$OUT/round29b_triton_gpu_tests.txt" \
  | head -40 | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

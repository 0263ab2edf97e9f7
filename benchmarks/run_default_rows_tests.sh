#!/usr/bin/env bash
# One H200 call: the fused Triton kernel's GPU tests (compiled, the whole grid) with the
# window program's default step now 64 rows.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_default_rows_tests.sh
source benchmarks/gpu_env.sh
T="$OUT/window_rows64_gpu_tests.txt"
start_log "$T"
INNERQ_KERNEL_TESTS=gpu timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider -rA \
  tests/test_kernels.py >> "$T" 2>&1
echo "fused kernel GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$T"
grep -E "passed|failed" "$T" | tail -2

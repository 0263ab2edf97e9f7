#!/usr/bin/env bash
# One H200 call after the fused Triton op became one launch (region sizes and live ring
# slots computed in the kernel): its GPU tests (compiled), the shape suite's short and long
# contexts beside the bf16 peer, OuterQ and the Mosaic op, then the trace of the timed
# program at the short contexts (launches per call, device busy time, span).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_one_launch.sh
source benchmarks/gpu_env.sh
LOG="$OUT/one_launch_log.txt"
start_log "$LOG"

T="$OUT/one_launch_gpu_tests.txt"
head -2 "$LOG" > "$T"
INNERQ_KERNEL_TESTS=gpu timeout "${TESTS_S:-170}" $PY -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py >> "$T" 2>&1
echo "fused kernel GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$T" "$LOG"
grep -E "passed|failed" "$T" | tail -2 | tee -a "$LOG"

V='["bf16_pallas", "innerq_fused", "outerq_fused", "innerq_mgpu"]'
timeout "${BENCH_S:-250}" $PY benchmarks/bench_kernels.py --suite points --tag _one_launch \
  --out "$OUT" --reps 5 --points "[[1, 4096, {}, $V], [8, 4096, {}, $V], [1, 32768, {}, $V],
    [8, 16384, {}, $V], [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"}, $V],
    [8, 32768, {}, $V], [1, 131072, {}, $V], [32, 16384, {}, $V]]" > "$OUT/kernels_points_one_launch_log.txt" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^\[| ms |MISMATCH|FAILED" "$OUT/kernels_points_one_launch_log.txt" | grep -vE "^\s+File" >> "$LOG"

timeout "${TRACE_S:-120}" $PY benchmarks/bench_kernels.py --suite trace --tag _one_launch --out "$OUT" \
  --reps 5 --shapes '[[1, 4096, {}], [8, 4096, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

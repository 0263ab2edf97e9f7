#!/usr/bin/env bash
# Round 17 (next H200 call): InnerQ-H's value rotation undone in the epilogue (finish="kernel":
# the last channel block's program per (sequence, kv head) rotates the merged rows), first its
# GPU tests (the op as the dispatch calls it, the recommended cache with both finishes; the
# dispatch's test, with its B 1 / 128k case), then InnerQ-H through the dispatch with both
# finishes beside the paper's InnerQ at the two target shapes, every point checked first;
# then the three shapes of the kernel suite round 16's limit cut, and B 1 / 4k traced.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round17.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round17_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round17_gpu_tests.txt" "${TESTS_S:-90}" tests/test_mgpu_kernels.py \
  -k "prepares_the_model or dispatch"
H='["bf16_pallas", "cfg_fused", "innerq-h_fused", "innerq-h_fused@{\"finish\": \"kernel\"}"]'
kernel_points _round17_finish "[[8, 32768, {}, $H], [1, 131072, {}, $H], [4, 32768, {}, $H]]" \
  "${FINISH_S:-200}"
R='["bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"'
P="[[8, 32768, {\"G\": 64}, $R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, $R]],
  [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"},
   $R, \"outerq_fused\"]]]"
kernel_points _round17_rest "${POINTS:-$P}" "${BENCH_S:-200}"
# B 1 / 4k by device time (the timed figure is launches; round 16): the Triton op the
# dispatch runs there and jax's bf16 kernel, traced
timeout "${TRACE_S:-60}" $PY benchmarks/bench_kernels.py --suite trace --tag _round17 \
  --out "$OUT" --reps 5 --options '{"ops": ["innerq_fused", "bf16_pallas"]}' \
  --shapes '[[1, 4096, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 16, third H200 call: the shapes of the kernel suite that run_round16b.sh's time limit
# left (the points suite, the same variants as the full suite's; merged into
# kernels_full_round16_merged.json by bench_kernels.py --merge), and the GPU test of the
# layer's dispatch at a shape its new rule sends to the Mosaic kernel.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round16c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round16c_log.txt"
start_log "$LOG"
WORKERS=4 gpu_tests "$OUT/round16c_gpu_tests.txt" "${TESTS_S:-60}" tests/test_mgpu_kernels.py \
  -k "dispatch"
R='["bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"'
P="[[1, 4096, {}, $R, \"outerq_fused\"]], [1, 32768, {}, $R, \"outerq_fused\"]],
  [8, 4096, {}, $R, \"outerq_fused\"]], [8, 16384, {}, $R, \"outerq_fused\"]],
  [32, 16384, {}, $R, \"outerq_fused\"]], [8, 32768, {\"bits\": 4}, $R, \"outerq_fused\"]],
  [8, 32768, {\"G\": 64}, $R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, $R]],
  [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"},
   $R, \"outerq_fused\"]]]"
kernel_points _round16_rest "${POINTS:-$P}" "${BENCH_S:-440}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

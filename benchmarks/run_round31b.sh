#!/usr/bin/env bash
# Round 31, second H200 call: the shapes of the kernel suite that run_round31.sh's limit left
# (the points suite, the full suite's variants at each shape; POINTS overrides the list),
# merged into kernels_full_round31_merged.json by bench_kernels.py --merge.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round31b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round31b_log.txt"
start_log "$LOG"
R='["bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"'
P="[[1, 4096, {}, $R, \"outerq_fused\"]], [1, 32768, {}, $R, \"outerq_fused\"]],
  [8, 4096, {}, $R, \"outerq_fused\"]], [8, 16384, {}, $R, \"outerq_fused\"]],
  [32, 16384, {}, $R, \"outerq_fused\"]], [8, 32768, {\"bits\": 4}, $R, \"outerq_fused\"]],
  [8, 32768, {\"G\": 64}, $R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, $R]],
  [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"},
   $R, \"outerq_fused\"]]]"
kernel_points _round31_rest "${POINTS:-$P}" "${BENCH_S:-520}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

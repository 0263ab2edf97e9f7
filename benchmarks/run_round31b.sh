#!/usr/bin/env bash
# Round 31, second H200 call: the three shapes of the kernel suite that run_round31.sh's limit
# left (G 64, MHA, the SmolLM2 shape; the full suite's variants at each), merged into
# kernels_full_round31_merged.json by bench_kernels.py --merge, then B 1 / 4k twice with
# the variants in opposite orders (the spread of a launch-bound shape). The points are the
# ones this call ran; POINTS overrides them.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round31b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round31b_log.txt"
start_log "$LOG"
R='["bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"'
P="[[8, 32768, {\"G\": 64}, $R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, $R]],
  [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"},
   $R, \"outerq_fused\"]],
  [1, 4096, {}, [\"bf16_pallas\", \"cudnn\", \"cfg_fused\", \"innerq_fused\"]],
  [1, 4096, {}, [\"innerq_fused\", \"cfg_fused\", \"cudnn\", \"bf16_pallas\"]]]"
kernel_points _round31_rest "${POINTS:-$P}" "${BENCH_S:-300}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 33, second H200 call: the two target shapes by device time (trace suite: each op's
# kernels per call, the dispatch beside cuDNN and jax's Pallas kernel), then the rest of the
# shape suite at the final library code (bench_kernels' points suite: every shape of
# --suite full but the two target shapes, which run_round33.sh timed; cuDNN added at each).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33b_log.txt"
start_log "$LOG"
OPTS='{"ops": ["innerq_dispatch", "cudnn", "bf16_pallas"], "inputs": ["rotating"]}'
trace_suite _round33b "[[8, 32768, {}], [1, 131072, {}]]" "$OPTS" "${TRACE_S:-150}"
rm -rf "$OUT/traces"
R='"cudnn", "bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"'
SMOL='"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"'
P="[[1, 4096, {}, [$R, \"outerq_fused\"]], [1, 32768, {}, [$R, \"outerq_fused\"]],
  [8, 4096, {}, [$R, \"outerq_fused\"]], [8, 16384, {}, [$R, \"outerq_fused\"]],
  [32, 16384, {}, [$R, \"outerq_fused\"]], [8, 32768, {\"bits\": 4}, [$R, \"outerq_fused\"]],
  [8, 32768, {\"G\": 64}, [$R]], [8, 8192, {\"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, [$R]],
  [8, 8192, {$SMOL}, [$R, \"outerq_fused\"]]]"
kernel_points _round33_rest "${POINTS:-$P}" "${BENCH_S:-420}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 30: the kernel benchmark with every buffer an argument of its timed program once
# (bench_kernels._multi), at the short shapes where the timed figure was the host's, and
# the long ones for the record; InnerQ-H as the model runs it (the value rotation folded
# into the weights: the cache rotates keys only) beside InnerQ-H as a standalone op.
# As run at be4d1b1: that commit's _multi took each buffer once; the protocol was invalid
# (XLA merged its bf16 peer's calls, KERNEL_NOTES.md round 30) and is reverted, so at later
# commits this script times with each call's own arguments.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round30.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round30_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
V='"bf16_xla", "bf16_pallas", "cudnn", "cfg_fused", "cfg_fused@{\"rotation\": \"keys\"}", "cfg_fused@{\"rotation\": \"keys_values\"}"'
S='{"Hq": 9, "Hkv": 3, "D": 64}'
R='"cfg_fused@{\"rotation\": \"keys\", \"sink\": 36, \"recent\": 96}", "cfg_qkernel@{\"rotation\": \"keys\", \"sink\": 36, \"recent\": 96}"'
kernel_points 30s "[[1, 4096, {}, [$V]], [8, 4096, {}, [$V]], [1, 32768, {}, [$V]], [8, 8192, $S, [$V, $R]], [1, 1024, $S, [$V, $R]], [1, 4096, $S, [$V, $R]]]" "${SHORT_S:-260}"
kernel_points 30l "[[8, 32768, {}, [$V]], [1, 131072, {}, [$V]]]" "${LONG_S:-200}"
rm -rf "$OUT/traces"
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 30b: where the recommended cache (keys rotated, the value rotation folded into the
# weights, as generate runs it) should rotate its query on the fused Triton kernel's path:
# in XLA before the call (the default) or in the kernel's prologue (rotate_query="kernel"),
# at the default model's shapes and the 8B shape's B 1 / 4k, beside InnerQ and bf16.
# Then the default model's step with each choice (INNERQ_ROTATE_QUERY).
# As run at 652c2ef: INNERQ_ROTATE_QUERY and the rule by program count exist there only
# (measured slower end to end and taken out), so at later commits its second step row
# repeats the first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round30b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round30b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
C='\"rotation\": \"keys\", \"sink\": 36, \"recent\": 96'
V="\"bf16_pallas\", \"cfg_fused\", \"cfg_fused@{$C}\", \"cfg_qkernel@{$C}\""
S='{"Hq": 9, "Hkv": 3, "D": 64}'
kernel_points 30b "[[1, 1024, $S, [$V]], [1, 4096, $S, [$V]], [8, 8192, $S, [$V]], [1, 4096, {}, [$V]]]" "${POINTS_S:-240}"
# the default model's step (SmolLM2 shape, B 1 / 1k, device loop, traced), the recommended
# cache's query rotated in XLA, then in the kernel's prologue (the env override)
TOP=6 step_rows 30x "${PROF_S:-100}" bf16:1,recommended:1 --budget-s 80
INNERQ_ROTATE_QUERY=kernel TOP=6 step_rows 30k "${PROF_S:-100}" bf16:1,recommended:1 --budget-s 80
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

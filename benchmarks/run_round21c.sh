#!/usr/bin/env bash
# Round 21c (one H200 call): where the default model's 2-bit step still loses to bf16 in
# generate's regime. (1) The SmolLM2 step in a device loop (20 greedy steps, B 1 / 1k),
# bf16 and InnerQ, traced: device time per op after round 20's write-kernel change. (2) The
# Triton op's short-context options round 20d's call cut (window rows 128, 7 splits, both),
# by device time at SmolLM2 B 1 / 1k, beside its default.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round21c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round21c_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 21cprof "${PROF_S:-200}" "$OUT/e2e_h200_round21cprof_log.txt" --model smollm2 \
  --suite cli --only bf16:1,innerq2:1 --call loop --steps 20 --profile --budget-s 170
profile_summary "$OUT/e2e_h200_round21cprof.json" 12
S='[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}]]'
i=0
for o in '{}' '{"window_rows": 128}' '{"num_splits": 7}' '{"num_splits": 7, "window_rows": 128}'; do
  TRACE_S=60 trace_op "_round21c_$i" "$S" "$o"
  i=$((i + 1))
done
rm -rf "$OUT/traces" "$OUT"/kernels_trace_round21c_[012].png  # (8 files come back at most)
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

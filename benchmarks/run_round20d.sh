#!/usr/bin/env bash
# Round 20d (one H200 call): the Triton op at the default model's short contexts by device
# time (bench_kernels.py --suite trace): SmolLM2 shape (Hq 9 / Hkv 3 / D 64) at B 1 / 1k and
# B 1 / 4k, the op's split count, block and window rows varied, beside jax's bf16 kernel.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round20d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round20d_log.txt"
start_log "$LOG"
S='[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}], [1, 4096, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T4k"}]]'
i=0
for o in '{}' '{"num_splits": 1}' '{"num_splits": 2}' '{"num_splits": 7}' \
         '{"block_tokens": 64, "num_splits": 7}' '{"window_rows": 32}' '{"window_rows": 128}' \
         '{"num_warps": 2}'; do
  ops='["innerq_fused"]'; [ $i -eq 0 ] && ops='["innerq_fused", "bf16_pallas"]'
  echo "== options $o" | tee -a "$LOG"
  timeout 60 $PY benchmarks/bench_kernels.py --suite trace --tag "_round20d_$i" --out "$OUT" \
    --reps 5 --options "{\"ops\": $ops, \"innerq_fused\": $o}" --shapes "$S" 2>&1 \
    | grep -E "one set|rotating|MISMATCH|FAILED|Error" | grep -v "^\s*[0-9.]* us  x" | tee -a "$LOG"
  i=$((i + 1))
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

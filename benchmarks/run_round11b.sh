#!/usr/bin/env bash
# Round 11, second H200 call: the decode step called through models.llama.DecodeStep (the
# model's arrays as a flat list) beside the NNX module passed to jit_decode_step on every
# call (the host walks the module each step), for bf16, the paper's InnerQ and the
# recommended cache at B 8 / 32k with a profile (device busy time per step), then the
# quantized caches at their largest batch at 32k through DecodeStep.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

timeout "${E2E_S:-260}" $PY benchmarks/bench_e2e.py --suite decode \
  --only bf16:8,innerq2:8,recommended:8 --call bound,module --profile --tag h200_round11b \
  --out "$OUT" --budget-s 220 > "$OUT/e2e_h200_round11b_log.txt" 2>&1
echo "e2e rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -16 "$OUT/e2e_h200_round11b_log.txt" | tee -a "$LOG"
rm -rf "$OUT/traces"

timeout "${MAX_S:-150}" $PY benchmarks/bench_e2e.py --suite max \
  --only innerq2:max,recommended:max,bf16:max --tag h200_round11b_max --out "$OUT" \
  --budget-s 120 > "$OUT/e2e_h200_round11b_max_log.txt" 2>&1
echo "e2e max rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -6 "$OUT/e2e_h200_round11b_max_log.txt" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

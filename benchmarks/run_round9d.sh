#!/usr/bin/env bash
# Round 9, fourth H200 call: the decode step end to end (Llama-3-8B shape, random weights)
# with the recommended cache (InnerQ-H, 36 sinks, 96 recent) beside bf16 and the paper's
# InnerQ at B 8 / 32k, and its largest batch at 32k; then the interpret-mode diagnosis with
# one and two splits and per (sequence, kv head) errors.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round9d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round9d_log.txt"
start_log "$LOG"

timeout "${E2E_S:-330}" $PY benchmarks/bench_e2e.py --suite decode,max \
  --only bf16:8,innerq2:8,recommended:8,recommended:max --tag h200_round9 --out "$OUT" \
  --budget-s 250 > "$OUT/e2e_h200_round9_log.txt" 2>&1
echo "e2e rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -7 "$OUT/e2e_h200_round9_log.txt" | tee -a "$LOG"

echo "== interpret mode on the GPU" | tee -a "$LOG"
timeout 90 $PY benchmarks/interpret_gpu_check.py 2>&1 | grep -vE "^\s*(File|warn)" | tail -20 \
  | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

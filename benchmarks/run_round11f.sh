#!/usr/bin/env bash
# Round 11, sixth H200 call: the recommended cache's step in one device loop (20 greedy
# steps per call, DecodeStep.greedy) beside one call per step, B 8 / 32k.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11f.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11f_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
timeout "${E2E_S:-150}" $PY benchmarks/bench_e2e.py --suite decode --only recommended:8 \
  --call loop,bound --steps 20 --tag h200_round11f --out "$OUT" --budget-s 110 \
  > "$OUT/e2e_h200_round11f_log.txt" 2>&1
echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -4 "$OUT/e2e_h200_round11f_log.txt" | tee -a "$LOG"

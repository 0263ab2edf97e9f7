#!/usr/bin/env bash
# Round 12, third H200 call. Round 12b measured one layer's append at B 8 (bench_append.py):
# XLA's quantization + write kernel 47.8 us, the kernel quantizing the groups itself at
# 1/2/4/8 warps 160 / 60 / 34.7 / 13.5 us; its e2e ran at 4 warps. Now 8 is the default:
# the append at 8 and 16 warps for both caches, then the 8B shape at B 8 / 32k (InnerQ, the
# recommended cache and bf16, one call per step and 20 greedy steps per call) and a profile.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round12c.sh
# (Its shell helpers moved to gpu_env.sh after the run: e2e_rows, profile_summary; the
# commands they run are the same.)
source benchmarks/gpu_env.sh
LOG="$OUT/round12c_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

timeout "${APPEND_S:-130}" $PY benchmarks/bench_append.py --out "$OUT" --tag h200_round12c \
  --warps 8,16 --reps 5 > /tmp/append.txt 2>&1
echo "append rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -9 /tmp/append.txt | tee -a "$LOG"

e2e_rows 12f "${F_S:-190}" "$OUT/e2e_h200_round12c_log.txt" \
  --only innerq2:8,recommended:8,bf16:8 --call bound,loop --steps 20 \
  --budget-s 170
e2e_rows 12g "${G_S:-80}" "$OUT/e2e_h200_round12c_log.txt" \
  --only innerq2:8 --call bound --profile --steps 10 --budget-s 60
profile_summary "$OUT/e2e_h200_round12g.json"
rm -rf "$OUT/traces" "$OUT/e2e_h200_round12g.png"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

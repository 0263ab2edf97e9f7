#!/usr/bin/env bash
# Round 26 (one short H200 call): why generate's loop costs InnerQ more per token than the
# device loop of DecodeStep.greedy does (round 25: generate bf16 1.085 / InnerQ 1.249 ms per
# token, the device loop 1.15 / 1.18 ms per step): one long generate run per cache traced
# (bench_generate.py --profile): device ops and host events per generated token.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round26.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round26_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
generate_rows 26 "${GEN_S:-250}" --caches bf16,innerq2,recommended --prompt 800 --new 160 \
  --short 32 --reps 2 --profile
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

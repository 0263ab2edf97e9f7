#!/usr/bin/env bash
# Round 22d (one H200 call): generate's time per token again, by the difference of a 192- and
# a 32-token run (a longer difference than 22c's 96 / 32, five repetitions each), bf16,
# InnerQ and the recommended cache (the CLI's); then the default model's step with the
# recommended cache in a device loop (SmolLM2, B 1 / 1k, 20 greedy steps, traced).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round22d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round22d_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
generate_rows 22d "${GEN_S:-210}" --caches bf16,innerq2,recommended --prompt 800 --new 192 \
  --short 32 --reps 5
step_rows 22d "${PROF_S:-150}" bf16:1,recommended:1 --budget-s 130
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

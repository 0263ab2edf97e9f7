#!/usr/bin/env bash
# Round 20 (one H200 call): the default model's own regime end to end. SmolLM2-135M shape
# (random weights), bf16 / InnerQ / the recommended cache at B 1 / 1k (what `innerq generate`
# runs), B 1 / 4k and B 8 / 8k, one call per step and a device loop; then the B 1 / 1k rows
# traced (kernels per step and the costliest ops) and their compiled steps.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round20.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round20_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 20short "${SHORT_S:-230}" "$OUT/e2e_h200_round20short_log.txt" --model smollm2 \
  --suite short --call bound,loop --steps 20 --budget-s 200
e2e_rows 20cli "${CLI_S:-150}" "$OUT/e2e_h200_round20cli_log.txt" --model smollm2 \
  --suite cli --steps 5 --profile --hlo --budget-s 130
profile_summary "$OUT/e2e_h200_round20cli.json" 25
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

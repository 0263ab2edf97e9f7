#!/usr/bin/env bash
# Round 21 (one H200 call): generate's loop (what `innerq generate` runs) by chunk size: the
# stop condition tested every step (chunk 1, the host waits on each) or every 8 / 32 steps.
# SmolLM2 shape (random weights), a 960-token prompt, 64 new tokens, bf16 / InnerQ / the
# recommended cache; without and with a (no-op) stream callback, as the CLI streams.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round21.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round21_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
for s in "" --stream; do
  timeout "${GEN_S:-200}" $PY benchmarks/bench_generate.py --model smollm2 --chunks 1,8,32 \
    --out "$OUT" $s > "$OUT/generate_log${s}.txt" 2>&1
  echo "bench_generate $s rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -A12 "^cache " "$OUT/generate_log${s}.txt" | tee -a "$LOG"
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

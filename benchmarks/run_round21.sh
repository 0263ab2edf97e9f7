#!/usr/bin/env bash
# Round 21 (H200 calls): the whole -m gpu record at this commit (the three modules that hold
# no GPU test and import gguf, absent on the GPU machine, left out), then generate's loop
# (what `innerq generate` runs) by chunk size: the stop condition tested every step (chunk
# 1, the host waits on each) or every 8 / 32 steps. SmolLM2 shape (random weights), a
# 960-token prompt, 64 new tokens, bf16 / InnerQ / the recommended cache; STREAM="" (no
# callback) or STREAM=--stream (a no-op stream callback, as the CLI streams).
# It ran at c758fc1 and ea41b86; generate's chunk option was removed after it measured no
# gain (benchmarks/KERNEL_NOTES.md, round 21): check out ea41b86 to run it again.
# Usage (repository root, on the GPU machine):
#   COMMIT=<hash> TESTS=1 STREAM="" bash benchmarks/run_round21.sh
#   COMMIT=<hash> TESTS=0 STREAM=--stream bash benchmarks/run_round21.sh
source benchmarks/gpu_env.sh
S=${STREAM-}
LOG="$OUT/round21${S:+_stream}_log.txt"
start_log "$LOG"
if [ "${TESTS:-1}" = 1 ]; then
  gpu_tests "$OUT/round21_gpu_tests.txt" "${TESTS_S:-260}" tests \
    --ignore=tests/test_weights.py --ignore=tests/test_evaluate.py --ignore=tests/test_cli.py
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout "${GEN_S:-200}" $PY benchmarks/bench_generate.py --model smollm2 --chunks "${CHUNKS:-1,8,32}" --caches "${CACHES:-bf16,innerq2,recommended}" \
  --out "$OUT" $S > "$OUT/generate_log${S}.txt" 2>&1
echo "bench_generate $S rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -A12 "^cache " "$OUT/generate_log${S}.txt" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

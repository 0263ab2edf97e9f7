#!/usr/bin/env bash
# Round 21f (one H200 call): generate's fixed cost per run (the difference method's
# intercept: run(32 new) - 31 x the time per token; 20 ms bf16 / 40 ms InnerQ in round 21e
# against a standalone prefill of 5.8 / 9.7 ms) with XLA's command buffers off, to see
# whether it is the CUDA graphs' set-up per run.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round21f.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round21f_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout "${GEN_S:-180}" $PY \
  benchmarks/bench_generate.py --model smollm2 --caches bf16,innerq2 --prompt 928 \
  --new 96 --short 32 --reps 2 --tag h200_smollm2_diff_nocb --out "$OUT" > /tmp/gen.txt 2>&1
echo "bench_generate (command buffers off) rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "ms per token|^cache|^bf16|^innerq2|Error" /tmp/gen.txt | tee -a "$LOG"
rm -f "$OUT"/*.png
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

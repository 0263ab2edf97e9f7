#!/usr/bin/env bash
# Round 21e (one H200 call) at the session's last kernel commit: (1) every -m gpu test (the
# three modules that hold none and import gguf left out); (2) generate's time per token by
# the difference of two runs (96 and 32 new tokens, the same 1k cache: the prefill and every
# shared cost cancel), bf16 and InnerQ; (3) the fused Triton kernel's test module compiled
# on the GPU (INNERQ_KERNEL_TESTS=gpu; the split rule of round 21).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round21e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round21e_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round21e_gpu_tests.txt" "${TESTS_S:-220}" tests \
  --ignore=tests/test_weights.py --ignore=tests/test_evaluate.py --ignore=tests/test_cli.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout "${GEN_S:-170}" $PY benchmarks/bench_generate.py --model smollm2 --caches bf16,innerq2 \
  --prompt 928 --new 96 --short 32 --tag h200_smollm2_diff --out "$OUT" \
  > /tmp/gen.txt 2>&1
echo "bench_generate rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "ms per token|^cache|^bf16|^innerq2|Error" /tmp/gen.txt | tee -a "$LOG"
triton_gpu_tests "$OUT/round21e_triton_gpu_tests.txt" "" "${TRITON_S:-110}" tests/test_kernels.py
rm -f "$OUT"/generate_h200_smollm2_diff.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

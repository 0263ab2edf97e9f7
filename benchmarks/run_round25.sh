#!/usr/bin/env bash
# Round 25 (one H200 call): at one sequence the model's projections run on two rows
# (models.llama.project; round 24's HLO: every projection of SmolLM2 at one sequence ran as
# a weight-sized multiply and a reduce). (1) The model's -m gpu tests (the compiled step has
# no weight-sized reduction; with INNERQ_VECTOR_DOTS=keep it has five); (2) the default
# model's step in a device loop (SmolLM2, B 1 / 1k: bf16, InnerQ, the recommended cache),
# traced, with the two-row products and then with the vector products kept (tag 25k);
# (3) generate's time per token: bf16, the recommended cache folded and unfolded, InnerQ.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round25.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round25_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round25_gpu_tests.txt" "${TESTS_S:-120}" tests/test_model.py \
  tests/test_decode_memory.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
TOP=12 step_rows 25 "${PROF_S:-150}" bf16:1,innerq2:1,recommended:1 --budget-s 120
export INNERQ_VECTOR_DOTS=keep
TOP=6 step_rows 25k "${PROF_S:-150}" bf16:1,innerq2:1,recommended:1 --budget-s 120
unset INNERQ_VECTOR_DOTS
generate_rows 25 "${GEN_S:-270}" --caches bf16,recommended,recommended~unfolded,innerq2 \
  --prompt 800 --new 160 --short 32 --reps 5
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

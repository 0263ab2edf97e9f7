#!/usr/bin/env bash
# Round 24 (one H200 call): the recommended cache's value rotation folded into the weights
# (models.llama.fold_value_rotation; generate and DecodeStep fold by default). (1) The model's
# -m gpu tests (the folded step on the GPU's kernels against the unfolded one); (2) the
# default model's step in a device loop (SmolLM2, B 1 / 1k: bf16, InnerQ, the recommended
# cache folded and unfolded), traced, each row's compiled HLO kept (one tar); (3) generate's
# time per token, the same caches, paired runs.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round24.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round24_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round24_gpu_tests.txt" "${TESTS_S:-120}" tests/test_model.py \
  tests/test_decode_memory.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
TOP=12 step_rows 24 "${PROF_S:-200}" bf16:1,innerq2:1,recommended:1 --hlo --fold-values on,off \
  --budget-s 170
tar -C "$OUT" -czf "$OUT/e2e_h200_round24_hlo.tgz" hlo && rm -rf "$OUT/hlo"
generate_rows 24 "${GEN_S:-200}" --caches bf16,innerq2,recommended,recommended~unfolded \
  --prompt 800 --new 160 --short 32 --reps 5
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

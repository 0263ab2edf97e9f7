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
e2e_rows 24 "${PROF_S:-200}" "$OUT/e2e_h200_round24_log.txt" --model smollm2 \
  --suite cli --only bf16:1,innerq2:1,recommended:1 --call loop --steps 20 --profile \
  --hlo --fold-values on,off --budget-s 170
profile_summary "$OUT/e2e_h200_round24.json" 12
tar -C "$OUT" -czf "$OUT/e2e_h200_round24_hlo.tgz" hlo && rm -rf "$OUT/hlo"
timeout "${GEN_S:-200}" $PY benchmarks/bench_generate.py --model smollm2 \
  --caches bf16,innerq2,recommended,recommended~unfolded --prompt 800 --new 160 --short 32 \
  --reps 5 --tag h200_smollm2_round24 --out "$OUT" > /tmp/gen.txt 2>&1
echo "bench_generate rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "ms per token|^cache|^bf16|^innerq2|^recommended|Error" /tmp/gen.txt | tee -a "$LOG"
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 28b (one H200 call): a decode step's Hadamard rotations (at most 256 rows) as a
# float32 multiply and sum over D (innerq_jax.cache.hadamard_rotate) instead of a product
# with H, which XLA runs as a TF32 kernel of its own. (1) The default model's step (SmolLM2
# shape, B 1 / 1k, device loop, traced): bf16, InnerQ, the recommended cache folded and
# unfolded; (2) InnerQ-H and the paper's InnerQ through the dispatch beside jax's bf16
# kernel at B 8 / 32k and B 1 / 128k, every point checked first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round28b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round28b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
TOP=14 step_rows 28b "${PROF_S:-190}" bf16:1,innerq2:1,recommended:1 --fold-values on,off \
  --budget-s 170
unset XLA_PYTHON_CLIENT_MEM_FRACTION
H='["bf16_pallas", "cfg_fused", "innerq-h_fused"]'
kernel_points _round28b "[[8, 32768, {}, $H], [1, 131072, {}, $H]]" "${POINTS_S:-150}"
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

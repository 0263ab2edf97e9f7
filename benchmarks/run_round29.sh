#!/usr/bin/env bash
# Round 29 (the session's last H200 call): the GPU record at its final commit. (1) Every
# -m gpu test (the three gguf-importing modules left out); (2) the fused Triton kernel's
# tests compiled on the GPU (tests/test_kernels.py, INNERQ_KERNEL_TESTS=gpu; its merge's
# weighting was rewritten once for both paths); (3) the default model's short suite (SmolLM2
# shape, B 1 / 1k, B 1 / 4k, B 8 / 8k, device loop) with the value rotation folded.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round29.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round29_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round29_gpu_tests.txt" "${TESTS_S:-200}"
triton_gpu_tests "$OUT/round29_triton_gpu_tests.txt" "" "${TRITON_S:-170}" tests/test_kernels.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 29s "${SHORT_S:-140}" "$OUT/e2e_h200_round29s_log.txt" --model smollm2 \
  --suite short --call loop --steps 20 --budget-s 120
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

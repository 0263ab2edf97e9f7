#!/usr/bin/env bash
# Round 22b (one H200 call) at the window programs' default: (1) every -m gpu test (the
# Mosaic op's epilogue reads the windows through the same code; the three modules that hold
# none and import gguf left out); (2) the default model's step in a device loop (SmolLM2,
# B 1 / 1k, bf16 and InnerQ, 20 greedy steps, traced); (3) the op through the dispatch at
# the long-context targets (B 8 / 32k, B 1 / 128k: the Mosaic op, whose epilogue holds the
# windows) and at SmolLM2 B 1 / 1k, by device time beside jax's bf16 Pallas kernel.
# (Run at b6bbe98 with the -m gpu step written out; gpu_env.sh's every_gpu_test runs the same.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round22b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round22b_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round22b_gpu_tests.txt" "${TESTS_S:-200}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
step_rows 22b "${PROF_S:-160}" bf16:1,innerq2:1 --budget-s 140
unset XLA_PYTHON_CLIENT_MEM_FRACTION
TRACE_S=${TRACE_S:-110} trace_op _round22b_long '[[8, 32768, {}], [1, 131072, {}]]' '{}' \
  '["innerq_dispatch", "bf16_pallas"], "inputs": ["rotating"]'
TRACE_S=50 trace_op _round22b_1k '[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}]]' \
  '{}' '["innerq_dispatch", "bf16_pallas"], "inputs": ["rotating"]'
rm -rf "$OUT/traces" "$OUT"/kernels_trace_round22b_*.png "$OUT"/e2e_h200_round22b.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 18 (one H200 call): the fused q/k/v projection. Its GPU test (no weight-sized
# reduction left in a one-sequence step), then one stream at 128k end to end (bf16, InnerQ,
# the recommended cache, OuterQ; round 17's profile found the key and value projections
# strength-reduced there, one fused into the recommended cache's write), then B 8 / 32k with
# the recommended cache beside round 15's rows. Llama-3-8B shape, random weights.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round18.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round18_log.txt"
start_log "$LOG"
WORKERS=0 gpu_tests "$OUT/round18_gpu_tests.txt" "${TESTS_S:-90}" tests/test_decode_memory.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
e2e_rows 18long "${LONG_S:-200}" "$OUT/e2e_h200_round18long_log.txt" --suite long \
  --call bound,loop --steps 20 --budget-s 180
e2e_rows 18 "${DECODE_S:-220}" "$OUT/e2e_h200_round18_log.txt" \
  --only bf16:8,innerq2:8,recommended:8,outerq2:8 --call bound,loop --steps 20 --budget-s 200
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 27 (one H200 call, first of the session): the GEMV probe and the value-rotation fold
# beyond the default model. (1) The GEMV's -m gpu tests and its probe (pallas_kernels/gemv.py
# against XLA's strength-reduced vector-matrix product at SmolLM2's projection shapes); (2)
# the 8B shape's decode step at B 8 / 32k and one stream at 128k for the recommended cache
# folded and unfolded beside InnerQ and bf16 (device loop; round 18's rows are unfolded).
# The whole -m gpu record runs in the session's last call, at its final commit.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round27.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round27_log.txt"
start_log "$LOG"
WORKERS=0 gpu_tests "$OUT/round27_gemv_gpu_tests.txt" 90 tests/test_gemv.py
timeout "${GEMV_S:-90}" $PY benchmarks/gemv_probe.py --out "$OUT" > /tmp/gemv.txt 2>&1
echo "gemv probe rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -vE "^\{" /tmp/gemv.txt | tail -30 | tee -a "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 27 "${E2E_S:-240}" "$OUT/e2e_h200_round27_log.txt" --suite decode,long \
  --only bf16:8,innerq2:8,recommended:8,bf16:1,innerq2:1,recommended:1 --call loop \
  --fold-values on,off --steps 10 --budget-s 220
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

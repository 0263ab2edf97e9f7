#!/usr/bin/env bash
# Round 27 (one H200 call), prepared at the end of round 26: the GPU record at the session's
# final commit and the value-rotation fold beyond the default model. (1) Every -m gpu test
# (the three gguf-importing modules left out); (2) the 8B shape's decode step at B 8 / 32k
# and one stream at 128k for the recommended cache folded and unfolded beside InnerQ and
# bf16 (device loop; round 18's rows are unfolded); (3) the default model's short suite
# (B 1 / 1k, B 1 / 4k, B 8 / 8k) with the fold; (4) the GEMV probe (pallas_kernels/gemv.py
# against XLA's strength-reduced vector-matrix product at SmolLM2's projection shapes).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round27.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round27_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round27_gpu_tests.txt" "${TESTS_S:-200}"
timeout "${GEMV_S:-90}" $PY benchmarks/gemv_probe.py --out "$OUT" > /tmp/gemv.txt 2>&1
echo "gemv probe rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -vE "^\{" /tmp/gemv.txt | tail -30 | tee -a "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 27 "${E2E_S:-200}" "$OUT/e2e_h200_round27_log.txt" --suite decode,long \
  --only bf16:8,innerq2:8,recommended:8,bf16:1,innerq2:1,recommended:1 --call loop \
  --fold-values on,off --steps 10 --budget-s 180
e2e_rows 27s "${SHORT_S:-150}" "$OUT/e2e_h200_round27s_log.txt" --model smollm2 \
  --suite short --call loop --steps 20 --budget-s 130
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

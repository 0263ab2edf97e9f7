#!/usr/bin/env bash
# Round 14, third H200 call: the OuterQ Mosaic kernel after the first call (correct on six of
# seven grid cases, slower than the Triton OuterQ kernel). The two grid cases with one
# value group per token (D 64, G 64) after their fix; the compiled kernels' registers and
# opcode counts (InnerQ beside OuterQ); the OuterQ kernel alone and as an op at B 8 / 32k and
# B 1 / 128k with three and two programs per SM, the InnerQ default beside.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14c_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round14c_gpu_tests.txt"
timeout "${TESTS_S:-60}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_mgpu_kernels.py \
  -k "outer and smollm" >> "$OUT/round14c_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round14c_gpu_tests.txt" | tail -2 | tee -a "$LOG"
mosaic_sass "$OUT/round14c_sass.log.gz" '[{}, {"kind": "outerq"}]'
mosaic_probe _round14c '[{}, {"kind": "outerq"}, {"kind": "outerq", "ctas_per_sm": 2}]' \
  "${PROBE_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

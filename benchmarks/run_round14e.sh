#!/usr/bin/env bash
# Round 14, fifth H200 call. The OuterQ Mosaic kernel's GPU grid at its final code (both
# window paths); then the InnerQ kernel with 256-token blocks again (round 4 measured them
# slower, 0.192 against 0.156 ms, before rounds 5-8 cut the loop): per block the copy
# refill, the three warpgroup barriers and the softmax exchanges are paid once per 256
# tokens. Two stages (four do not fit three programs' shared memory), the key chain whole
# or in two parts (its A operands are 128 registers whole), beside the default.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14e_log.txt"
start_log "$LOG"
head -2 "$LOG" > "$OUT/round14e_gpu_tests.txt"
timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_mgpu_kernels.py \
  -k "outer" >> "$OUT/round14e_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round14e_gpu_tests.txt" | tail -2 | tee -a "$LOG"
mosaic_sass "$OUT/round14e_sass.log.gz" '[{"block_tokens": 256, "num_stages": 2},
  {"block_tokens": 256, "num_stages": 2, "chain_parts": 2}]'
mosaic_probe _round14e '[{}, {"block_tokens": 256, "num_stages": 2},
  {"block_tokens": 256, "num_stages": 2, "chain_parts": 2},
  {"block_tokens": 256, "num_stages": 3, "chain_parts": 2, "ctas_per_sm": 2}]' "${PROBE_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 8 (one H200 call), with the dispatch rule in place (the Mosaic GPU op with its
# epilogue and wide copy boxes at >= 64 (sequence, kv head) pairs and a >= 16k-token cache,
# the fused Triton op elsewhere): the end-to-end decode step of the Llama-3-8B shape
# (random weights) at B 8 / 32k and at the largest batch, the timed programs of both
# fused ops traced at B 1 / 128k and B 8 / 32k (where the epilogue's time goes), and the
# Mosaic op with two and three programs per SM at the long shapes.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_dispatch_e2e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/dispatch_e2e_log.txt"
start_log "$LOG"

timeout "${E2E_S:-260}" $PY benchmarks/bench_e2e.py --suite decode,max --only bf16:8,innerq2:8,innerq2:max \
  --tag h200_round8 --out "$OUT" --budget-s 200 > "$OUT/e2e_h200_round8_log.txt" 2>&1
echo "e2e rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -8 "$OUT/e2e_h200_round8_log.txt" >> "$LOG"

timeout "${TRACE_S:-120}" $PY benchmarks/bench_kernels.py --suite trace --tag _round8 \
  --out "$OUT" --reps 5 --options '{"ops": ["innerq_fused", "innerq_mgpu"]}' \
  --shapes '[[1, 131072, {}], [8, 32768, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"

P='[{"windows": "epilogue", "wide_copies": true, "ctas_per_sm": 2}]'
timeout "${PROBE_S:-80}" $PY benchmarks/mgpu_probe.py --stage kernel --points "$P" --out "$OUT" \
  --tag _ctas2 2>&1 | grep -E " op |FAILED" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

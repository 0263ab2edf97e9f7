#!/usr/bin/env bash
# Round 8 (one H200 call): the Mosaic GPU op's query operands in one Triton launch
# (query="kernel", pallas_kernels/mgpu_query.py) instead of four XLA fusions: the GPU tests
# of that variant compiled, kernel-only and op timings at B 8 / 32k and B 1 / 128k beside
# the XLA query operands and with two programs per SM, then the shorter suite shapes beside
# the fused Triton op and jax's bf16 kernel (every point checked against the reference
# first; pipelined).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_query_kernel.sh
source benchmarks/gpu_env.sh
LOG="$OUT/query_kernel_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/query_kernel_gpu_tests.txt" "epilogue-query" "${TESTS_S:-110}"

P='[{"windows": "epilogue", "wide_copies": true, "query": "kernel"},
    {"windows": "epilogue", "wide_copies": true, "query": "kernel", "ctas_per_sm": 2},
    {"windows": "epilogue", "wide_copies": true, "query": "xla"}]'
timeout "${PROBE_S:-110}" $PY benchmarks/mgpu_probe.py --stage kernel --points "$P" --out "$OUT" \
  --tag _query 2>&1 | grep -E " op |FAILED" | tee -a "$LOG"
echo "probe done (elapsed $SECONDS s)" | tee -a "$LOG"

V='["bf16_pallas", "innerq_fused", "innerq_mgpu@{\"windows\": \"epilogue\", \"wide_copies\": true, \"query\": \"kernel\"}"]'
SM='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
timeout "${BENCH_S:-170}" $PY benchmarks/bench_kernels.py --suite points --tag _query_kernel \
  --out "$OUT" --reps 5 --points "[[8, 16384, {}, $V], [1, 32768, {}, $V], [8, 4096, {}, $V],
    [8, 8192, $SM, $V], [1, 4096, {}, $V]]" > "$OUT/kernels_points_query_kernel_log.txt" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^\[| ms |MISMATCH|FAILED" "$OUT/kernels_points_query_kernel_log.txt" | grep -vE "^\s+File" >> "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

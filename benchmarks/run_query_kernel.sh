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
mosaic_probe _query "$P" "${PROBE_S:-110}"

V='["bf16_pallas", "innerq_fused", "innerq_mgpu@{\"windows\": \"epilogue\", \"wide_copies\": true, \"query\": \"kernel\"}"]'
SM='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
kernel_points _query_kernel "[[8, 16384, {}, $V], [1, 32768, {}, $V], [8, 4096, {}, $V],
  [8, 8192, $SM, $V], [1, 4096, {}, $V]]" "${BENCH_S:-170}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

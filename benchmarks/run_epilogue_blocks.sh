#!/usr/bin/env bash
# Round 8 (one H200 call): the epilogue's merge spread over channel blocks (grid (kv head,
# sequence, channel block), eight splits' loads in flight per step) with the wide copy
# boxes: the Mosaic GPU tests of both epilogue variants compiled, kernel-only and op
# timings at B 8 / 32k and B 1 / 128k, then the shape suite beside the fused Triton op and
# jax's bf16 kernel (every point checked against the reference first; pipelined).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_epilogue_blocks.sh
source benchmarks/gpu_env.sh
LOG="$OUT/epilogue_blocks_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/epilogue_blocks_gpu_tests.txt" "emit-epilogue or epilogue-wide" "${TESTS_S:-160}"

P='[{"windows": "epilogue", "wide_copies": true}, {"windows": "epilogue"}]'
mosaic_probe _epilogue_blocks "$P" "${PROBE_S:-90}"

V='["bf16_pallas", "innerq_fused", "innerq_mgpu@{\"windows\": \"epilogue\", \"wide_copies\": true}"]'
SM='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
kernel_points _epilogue_blocks "[[8, 32768, {}, $V], [1, 131072, {}, $V], [8, 16384, {}, $V],
  [1, 32768, {}, $V], [8, 4096, {}, $V], [1, 4096, {}, $V], [8, 8192, $SM, $V],
  [32, 16384, {}, $V]]" "${BENCH_S:-300}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

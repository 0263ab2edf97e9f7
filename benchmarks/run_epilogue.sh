#!/usr/bin/env bash
# One H200 call for the Mosaic GPU op's one-launch epilogue (windows + merge in a Triton
# kernel, pallas_kernels/mgpu_epilogue.py): the Mosaic GPU tests compiled (XLA merge and
# epilogue), then the shape suite with the bf16 peer, the fused Triton op and the Mosaic op
# with each merge, every point checked against the reference before it is timed; the timed
# figure is pipelined (4 timed programs back to back, one sync), the one-run-per-sync
# figure is kept beside it (ms_one_program).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_epilogue.sh
source benchmarks/gpu_env.sh
LOG="$OUT/epilogue_log.txt"
start_log "$LOG"

mosaic_gpu_tests "$OUT/epilogue_gpu_tests.txt" "emit-xla or emit-epilogue" "${TESTS_S:-160}"

V='["bf16_pallas", "innerq_fused", "innerq_mgpu", "innerq_mgpu@{\"windows\": \"epilogue\"}"]'
SM='{"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}'
kernel_points _epilogue "[[1, 4096, {}, $V], [8, 8192, $SM, $V], [8, 32768, {}, $V],
  [1, 131072, {}, $V], [8, 4096, {}, $V], [1, 32768, {}, $V], [8, 16384, {}, $V],
  [32, 16384, {}, $V]]" "${BENCH_S:-360}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

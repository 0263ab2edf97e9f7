#!/usr/bin/env bash
# One H200 call: the timed programs traced at the short contexts where the fused op is still
# slower than bf16 (B 1 / 4k, the SmolLM2 shape), the Mosaic op with its one-launch epilogue.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_epilogue_trace.sh
source benchmarks/gpu_env.sh
LOG="$OUT/epilogue_trace_log.txt"
start_log "$LOG"
timeout "${TRACE_S:-300}" python3 benchmarks/bench_kernels.py --suite trace --tag _epilogue \
  --out "$OUT" --reps 5 --options '{"innerq_mgpu": {"windows": "epilogue"}}' \
  --shapes '[[1, 4096, {}], [8, 8192, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B8-T8k-Hq9-Hkv3-D64"}]]' \
  2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"

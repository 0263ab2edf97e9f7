#!/usr/bin/env bash
# Round 15, fourth H200 call: where the Mosaic op's time beside its kernel goes now (the
# query kernel, the epilogue, the waits between launches), traced in the timed program at
# B 1 / 128k and B 8 / 32k beside the fused Triton op (each op checked first).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15d_log.txt"
start_log "$LOG"
timeout "${TRACE_S:-200}" $PY benchmarks/bench_kernels.py --suite trace --tag _round15 \
  --out "$OUT" --reps 5 --options '{"ops": ["innerq_fused", "innerq_mgpu"]}' \
  --shapes '[[1, 131072, {}], [8, 32768, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"

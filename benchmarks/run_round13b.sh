#!/usr/bin/env bash
# Round 13, second H200 call: the whole shape suite of docs/benchmarks.md (bench_kernels.py
# --suite full: every peer and variant at the two target shapes, elsewhere jax's bf16 Pallas
# kernel against the fused Triton kernel, the Mosaic op and the OuterQ kernel), each row
# checked against the reference first; the JSON is rewritten after every shape, so a time
# limit keeps the rows done.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round13b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round13b_log.txt"
start_log "$LOG"
timeout "${SUITE_S:-520}" $PY benchmarks/bench_kernels.py --suite full --tag _round13 \
  --out "$OUT" --reps 5 > "$OUT/kernels_full_round13_log.txt" 2>&1
echo "suite rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -45 "$OUT/kernels_full_round13_log.txt" >> "$LOG"

#!/usr/bin/env bash
# Short contexts (one H200 call): where the fused op's time goes when the context is short
# and the kernels lose to bf16 (B 1 / 4k, B 8 / 4k). Per-kernel device time of one call from
# the jax profiler (Triton InnerQ and OuterQ ops, Mosaic op) at four shapes, then ablations of
# the fused Triton kernel (no window program, no merge, no quantized loop), then the Mosaic
# kernel alone at B 8 / 32k with its JSON.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_short.sh
source benchmarks/gpu_env.sh
LOG="$OUT/short_log.txt"
start_log "$LOG"

echo "== trace (elapsed $SECONDS s)" | tee -a "$LOG"
timeout 150 $PY benchmarks/bench_kernels.py --suite trace --tag _short --out "$OUT" \
  --shapes '[[1, 4096, {}], [8, 4096, {}], [1, 32768, {}], [8, 32768, {}]]' 2>&1 \
  | grep -vE "^\s*$" | tee -a "$LOG" | tail -3

echo "== ablations (elapsed $SECONDS s)" | tee -a "$LOG"
timeout 240 $PY benchmarks/bench_kernels.py --suite profile --tag _short --out "$OUT" --reps 5 \
  --shapes '[[1, 4096, {}], [8, 4096, {}], [1, 32768, {}]]' \
  --options '{"points": [{}, {"num_splits": 8}]}' 2>&1 | tee -a "$LOG" | tail -3

echo "== Mosaic kernel alone (elapsed $SECONDS s)" | tee -a "$LOG"
timeout 120 $PY benchmarks/mgpu_probe.py --stage kernel --points '[{}]' --out "$OUT" --tag _6 \
  2>&1 | grep -E " op |kernel|FAILED" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

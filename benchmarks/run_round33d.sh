#!/usr/bin/env bash
# Round 33, fourth H200 call: how much of the timed figure is the timed program's own
# boundary (the gap between timed and device-busy time per call, ~15 us at B 8 / 32k in
# round 33b's trace; ~13 us inside the call at B 1 / 128k): the dispatch and cuDNN at
# B 8 / 32k and B 1 / 128k with 32 and then 128 calls per
# timed program (bench_kernels --calls), each point checked against its reference first.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33d_log.txt"
start_log "$LOG"
P='[[8, 32768, {}, ["cudnn", "cfg_fused"]], [1, 131072, {}, ["cudnn", "cfg_fused"]]]'
for calls in 32 128; do
  timeout 120 $PY benchmarks/bench_kernels.py --suite points --tag "_round33d_calls$calls" \
    --out "$OUT" --reps 5 --calls "$calls" --points "$P" > "$OUT/kernels_points_round33d_calls${calls}_log.txt" 2>&1
  echo "calls $calls rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E " ms " "$OUT/kernels_points_round33d_calls${calls}_log.txt" | head -4 | tee -a "$LOG"
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

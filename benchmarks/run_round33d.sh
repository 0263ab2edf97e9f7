#!/usr/bin/env bash
# Round 33, fourth H200 call (prepared; not run in round 33, whose device time ran out): how much of the timed figure is the timed program's own
# boundary (the gap between timed and device-busy time per call, ~15 us at B 8 / 32k in
# round 33b's trace; ~13 us inside the call at B 1 / 128k): the dispatch and cuDNN at
# B 8 / 32k and B 1 / 128k with 32 and then 128 calls per
# timed program (bench_kernels --calls), each point checked against its reference first; before
# that the dispatch traced at both shapes, with the device's idle time before each of its
# launches and the host's costliest events (trace_summary's idle_before, host_summary).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round33d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round33d_log.txt"
start_log "$LOG"
OPTS='{"ops": ["innerq_dispatch"], "inputs": ["rotating"]}'
timeout "${TRACE_S:-80}" $PY benchmarks/bench_kernels.py --suite trace --tag _round33d \
  --out "$OUT" --reps 5 --options "$OPTS" --shapes "[[1, 131072, {}], [8, 32768, {}]]" \
  > "$OUT/kernels_trace_round33d_log.txt" 2>&1
echo "trace rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "rotating|idle|host|MISMATCH|FAILED|Error" "$OUT/kernels_trace_round33d_log.txt" | tee -a "$LOG"
rm -rf "$OUT/traces"
P='[[8, 32768, {}, ["cudnn", "cfg_fused"]], [1, 131072, {}, ["cudnn", "cfg_fused"]]]'
for calls in 32 128; do
  timeout 100 $PY benchmarks/bench_kernels.py --suite points --tag "_round33d_calls$calls" \
    --out "$OUT" --reps 5 --calls "$calls" --points "$P" > "$OUT/kernels_points_round33d_calls${calls}_log.txt" 2>&1
  echo "calls $calls rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E " ms " "$OUT/kernels_points_round33d_calls${calls}_log.txt" | head -4 | tee -a "$LOG"
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

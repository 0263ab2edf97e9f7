#!/usr/bin/env bash
# Round 15, fifth H200 call: the Mosaic op's epilogue alone (windows + merge, one Triton
# launch; 25 us of the op's 81 us device time at B 1 / 128k, 13 of 118 at B 8 / 32k in
# kernels_trace_round15.json), device time per variant from a trace, each checked against
# the XLA merge first (benchmarks/epilogue_probe.py).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round15e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round15e_log.txt"
start_log "$LOG"
timeout "${PROBE_S:-400}" $PY benchmarks/epilogue_probe.py --out "$OUT" --tag _round15 2>&1 \
  | grep -vE "^\s*$" | tee -a "$LOG"
echo "probe rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 14, fourth H200 call: the OuterQ Mosaic kernel alone and as an op at B 8 / 32k and
# B 1 / 128k with three and two programs per SM (ptxas gives it 215 registers: two programs
# of 128 threads fit an SM), checked against the OuterQ reference at bench_kernels' OuterQ
# bound (the third call's probe held it to InnerQ's 1e-2 and stopped at 1.15e-2).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round14d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round14d_log.txt"
start_log "$LOG"
mosaic_probe _round14d '[{"kind": "outerq"}, {"kind": "outerq", "ctas_per_sm": 2}]' \
  "${PROBE_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

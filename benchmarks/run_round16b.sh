#!/usr/bin/env bash
# Round 16, second H200 call: the whole kernel suite (bench_kernels.py --suite full) at the
# final kernel and epilogue, with the dispatch's own rows (cfg_fused) at every shape and its
# new rule (min_pair_tokens), every point warmed up and checked against its reference first.
# A cut suite is completed by run_round16c.sh and bench_kernels.py --merge.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round16b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round16b_log.txt"
start_log "$LOG"
timeout "${SUITE_S:-575}" $PY benchmarks/bench_kernels.py --suite full --tag _round16 \
  --out "$OUT" --reps 5 > "$OUT/kernels_full_round16_log.txt" 2>&1
echo "suite rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "^\[|elapsed" "$OUT/kernels_full_round16_log.txt" | tail -4 >> "$LOG"

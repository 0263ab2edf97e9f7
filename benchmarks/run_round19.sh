#!/usr/bin/env bash
# Round 19 (one H200 call): every -m gpu test at this commit (the fused projection's model
# included), then where InnerQ-H's extra time goes at B 1 / 128k and B 8 / 32k: the paper's
# InnerQ and InnerQ-H through the dispatch, traced (kernels' busy time per op), with the
# value rotation in XLA (default) and in the epilogue.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round19.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round19_log.txt"
start_log "$LOG"
gpu_tests "$OUT/round19_gpu_tests.txt" "${TESTS_S:-240}" tests
trace() {  # TAG OPTIONS
  timeout "${TRACE_S:-100}" $PY benchmarks/bench_kernels.py --suite trace --tag "$1" \
    --out "$OUT" --reps 5 --options "$2" --shapes '[[1, 131072, {}], [8, 32768, {}]]' 2>&1 \
    | grep -vE "^\s*$" >> "$LOG"
  echo "trace $1 rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
}
trace _round19 '{"ops": ["innerq_dispatch", "innerq-h_dispatch"]}'
trace _round19_finish '{"ops": ["innerq-h_dispatch"], "innerq-h_dispatch": {"finish": "kernel"}}'
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

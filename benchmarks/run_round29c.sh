#!/usr/bin/env bash
# Round 29c (one H200 call): every -m gpu test at the session's final commit again, with room
# for its summary (round 29's ran to 100% with no failure, its report cut by the limit).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round29c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round29c_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round29c_gpu_tests.txt" "${TESTS_S:-230}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

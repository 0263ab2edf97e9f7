#!/usr/bin/env bash
# Round 23 (one H200 call), prepared at the end of round 22: the done-counters from the
# cache write. (1) Every -m gpu test (the write kernel's new output compiled; the three
# modules that hold none and import gguf left out); (2) the default model's step in a device
# loop (SmolLM2, B 1 / 1k, bf16, InnerQ and the recommended cache, traced: the
# memcpy32_post of round 22's profile should be gone); (3) generate's time per token, the two
# lengths timed back to back in pairs (bench_generate.py), the median and range over pairs.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round23.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round23_log.txt"
start_log "$LOG"
every_gpu_test "$OUT/round23_gpu_tests.txt" "${TESTS_S:-200}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
step_rows 23 "${PROF_S:-170}" bf16:1,innerq2:1,recommended:1 --budget-s 150
generate_rows 23 "${GEN_S:-180}" --caches bf16,innerq2,recommended --prompt 800 --new 160 \
  --short 32 --reps 5
rm -rf "$OUT/traces" "$OUT"/*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

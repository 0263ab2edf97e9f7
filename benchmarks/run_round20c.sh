#!/usr/bin/env bash
# Round 20c (one H200 call): the cache write kernel quantizing a flush group only where a
# sequence flushes. Its GPU tests, then the default model's short-context rows again (bf16,
# InnerQ, the recommended cache; one call per step and a device loop), then the one-call
# step under XLA's command-buffer update mode SKIP_TEMP (stable addresses for temporaries).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round20c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round20c_log.txt"
start_log "$LOG"
WORKERS=0 gpu_tests "$OUT/round20c_gpu_tests.txt" "${TESTS_S:-120}" tests/test_cache_update.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 20c "${SHORT_S:-250}" "$OUT/e2e_h200_round20c_log.txt" --model smollm2 \
  --suite short --only bf16:1,innerq2:1,recommended:1,innerq2:8 --call bound,loop --steps 20 \
  --budget-s 220
XLA_FLAGS="--xla_gpu_command_buffer_update_mode=SKIP_TEMP" e2e_rows 20skiptemp "${SKIP_S:-90}" \
  "$OUT/e2e_h200_round20skiptemp_log.txt" --model smollm2 --suite cli --only bf16:1,innerq2:1 \
  --steps 20 --budget-s 70
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

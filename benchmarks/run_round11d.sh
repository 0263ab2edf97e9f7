#!/usr/bin/env bash
# Round 11, fourth H200 call: the quantized steps' host time is XLA updating its command
# buffers (CUDA graphs) on every call? XLA's xla_gpu_command_buffer_update_mode
# (ALWAYS_UPDATE; SKIP_TEMP keeps temporaries at fixed virtual addresses, VMM allocator)
# for the paper's InnerQ, the recommended cache and bf16 at B 8 / 32k, one process each.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11d_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

i=0
for flags in "--xla_gpu_command_buffer_update_mode=SKIP_TEMP" "" \
    "--xla_gpu_command_buffer_update_mode=SKIP_PROFILED"; do
  echo "== XLA_FLAGS='$flags'" | tee -a "$LOG"
  XLA_FLAGS="$flags" timeout "${E2E_S:-120}" $PY benchmarks/bench_e2e.py --suite decode \
    --only innerq2:8,recommended:8,bf16:8 --tag "h200_round11d_$i" --out "$OUT" \
    --budget-s 90 > /tmp/e2e_$i.txt 2>&1
  echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^(bf16|innerq2|recommended) |Error|error" /tmp/e2e_$i.txt | tail -4 | cut -c1-300 \
    | tee -a "$LOG"
  cat /tmp/e2e_$i.txt >> "$OUT/e2e_h200_round11d_log.txt"
  rm -f "$OUT/e2e_h200_round11d_$i.png"
  i=$((i + 1))
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

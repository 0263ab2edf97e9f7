#!/usr/bin/env bash
# Round 11, fifth H200 call: the quantized step is bound by the host's launches (round
# 11b-d). With the steps in one device loop (DecodeStep.greedy, as generate runs them) the
# host launches a loop, not each step: bf16 and the paper's InnerQ at B 8 / 32k, one call
# per step against 20 greedy steps per call, then the loop with XLA's command buffers
# also capturing while loops and conditionals (CUDA graph conditional nodes).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11e.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11e_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

i=0
for flags in "" \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"; do
  call=bound,loop; [ $i -gt 0 ] && call=loop
  echo "== XLA_FLAGS='$flags' (--call $call)" | tee -a "$LOG"
  XLA_FLAGS="$flags" timeout "${E2E_S:-200}" $PY benchmarks/bench_e2e.py --suite decode \
    --only innerq2:8,bf16:8 --call "$call" --steps 20 --tag "h200_round11e_$i" --out "$OUT" \
    --budget-s 170 > /tmp/e2e_$i.txt 2>&1
  echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^(bf16|innerq2)|Error|error" /tmp/e2e_$i.txt | grep -v "^{" | tail -4 | cut -c1-300 \
    | tee -a "$LOG"
  cat /tmp/e2e_$i.txt >> "$OUT/e2e_h200_round11e_log.txt"
  i=$((i + 1))
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

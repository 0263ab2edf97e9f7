#!/usr/bin/env bash
# Round 11, third H200 call: round 11b found the quantized steps bound by the host (a call
# takes 11-13 ms to return against 9 ms of device work; bf16's takes 1.7). Are the steps'
# ~1,100 launches in CUDA graphs (XLA command buffers)? XLA's GPU flags on command buffers
# as this jaxlib has them, then the paper's InnerQ step at B 8 / 32k (and bf16's) under
# each setting of XLA_FLAGS given below, one process each.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11c_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

echo "== XLA's command-buffer flags" | tee -a "$LOG"
XLA_FLAGS=--help timeout 60 $PY -c "import jax; jax.numpy.ones(1)" 2>&1 \
  | grep -iE "command_buffer|graph_min|cuda_graph|graph_level|graph_enable" | cut -c1-600 | tee -a "$LOG"

i=0
for flags in "" "--xla_gpu_enable_command_buffer=" \
    "--xla_gpu_graph_min_graph_size=1" \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"; do
  only=innerq2:8; [ $i -lt 2 ] && only=bf16:8,innerq2:8
  echo "== XLA_FLAGS='$flags' ($only)" | tee -a "$LOG"
  XLA_FLAGS="$flags" timeout "${E2E_S:-100}" $PY benchmarks/bench_e2e.py --suite decode \
    --only "$only" --tag "h200_round11c_$i" --out "$OUT" --budget-s 80 \
    > /tmp/e2e_$i.txt 2>&1
  echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^(bf16|innerq2) |Error|error" /tmp/e2e_$i.txt | tail -3 | cut -c1-300 | tee -a "$LOG"
  cat /tmp/e2e_$i.txt >> "$OUT/e2e_h200_round11c_log.txt"
  rm -f "$OUT/e2e_h200_round11c_$i.png"
  i=$((i + 1))
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

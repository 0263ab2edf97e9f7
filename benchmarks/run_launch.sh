#!/usr/bin/env bash
# Launch overhead (one H200 call): the timed program traced (per-call kernel time, busy time
# and span beside the timed ms, rotating inputs and one input set) at B 1 / 4k and B 8 / 32k,
# then the timed ops under three XLA command-buffer settings.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_launch.sh
source benchmarks/gpu_env.sh
LOG="$OUT/launch_log.txt"
start_log "$LOG"
echo "== trace of the timed program (elapsed $SECONDS s)" | tee -a "$LOG"
timeout 200 $PY benchmarks/bench_kernels.py --suite trace --tag _launch --out "$OUT" --reps 5 \
  --shapes '[[1, 4096, {}], [8, 32768, {}]]' 2>&1 | grep -vE "^\s*$" >> "$LOG"
V='["bf16_pallas", "innerq_fused", "innerq_mgpu"]'
for CB in default none all; do
  case $CB in
    default) FLAGS="" ;;
    none) FLAGS="--xla_gpu_enable_command_buffer=" ;;
    all) FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN" ;;
  esac
  echo "== command buffers: $CB (elapsed $SECONDS s)" | tee -a "$LOG"
  XLA_FLAGS="$FLAGS" timeout 100 $PY benchmarks/bench_kernels.py --suite points --tag "_cb_$CB" \
    --out "$OUT" --reps 5 --points "[[1, 4096, {}, $V], [8, 32768, {}, $V]]" 2>&1 \
    | grep -E " ms |MISMATCH|FAILED" >> "$LOG"
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

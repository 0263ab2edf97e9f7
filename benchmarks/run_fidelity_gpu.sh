#!/usr/bin/env bash
# The fidelity plan (benchmarks/run_fidelity.py) on the GPU machine, reference path.
#
# What the run needs beyond the repository travels beside it, git-ignored: the default
# model in two halves and the gguf wheel (benchmarks/gpu_model.sh), and .evaldata/, a copy
# of ../shared/data (WikiText-2, GSM8K).
# Usage on the machine:
#   bash benchmarks/run_fidelity_gpu.sh stash            # first call: keep half A
#   bash benchmarks/run_fidelity_gpu.sh run STEPS [ARGS] # later call: join, check, run
#   bash benchmarks/run_fidelity_gpu.sh finals           # later call, on two GPUs: the
#       issue-14 finalists on three texts, one process per configuration
#       (run_fidelity_parallel.py; the third text travels with the working tree), then,
#       if GREEDY_S > 0, the sharded greedy check with XLA's GEMM autotuning off
# Results go to $OUT/fidelity_results.tar.gz (the tool returns at most 8 files).
set -uo pipefail
source benchmarks/gpu_model.sh
case "${1:-}" in
  stash) stash_half_a; exit $? ;;
  run) mode=run; shift; steps=${1:?steps}; shift ;;
  finals) mode=finals; shift ;;
  *) echo "usage: $0 stash | run STEPS [run_fidelity args] | finals" >&2; exit 2 ;;
esac
join_model || exit $?
model=$MODEL
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
results=$OUT/results
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$mode" = run ]; then
  timeout "${FIDELITY_TIMEOUT:-540}" python3 benchmarks/run_fidelity.py --steps "$steps" \
    --model "$model" --data-dir "$PWD/.evaldata" --out "$results" --check-tag check_gpu "$@" \
    2>&1 | tee "$results/log_${steps//,/_}.txt"
  rc=$?
else
  timeout "${FINALS_S:-400}" python3 benchmarks/run_fidelity_parallel.py \
    --set "${SET:-finalists3}" --tag finalists3 --gpus 2 --model "$model" \
    --data-dir "$PWD/.evaldata" --out "$results" > "$results/final_log.txt" 2>&1
  rc=$?
  echo "finals rc=$rc (elapsed $SECONDS s)"
  grep -E "rc=|^\| |^# " "$results/final_log.txt" | tail -45
  if [ "${GREEDY_S:-0}" -gt 0 ]; then
    XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$GREEDY_S" python3 \
      benchmarks/sharded_greedy_check.py --model "$model" --mesh data=2 --new 96 \
      --out "$results" --tag _noautotune > "$results/greedy_noautotune_log.txt" 2>&1
    echo "greedy rc=$? (elapsed $SECONDS s)"; tail -5 "$results/greedy_noautotune_log.txt"
  fi
fi
tar -C "$OUT" -czf "$OUT/fidelity_results.tar.gz" results && rm -rf "$results"
exit $rc

#!/usr/bin/env bash
# The fidelity plan (benchmarks/run_fidelity.py) on the GPU machine, reference path.
#
# The machine has no network and takes at most 64 MiB of working tree per call,
# so what the run needs travels beside the repository (all git-ignored):
#   .whl/gguf-*.whl       the one package the machine lacks
#   .evaldata/            a copy of ../shared/data (WikiText-2, GSM8K)
#   .model_a/part, .model_b/part, .model_b/sha256
#                         the default GGUF split in two halves (`split -n 2`);
#                         a first call copies .model_a/part to $MODEL_DIR,
#                         the next (on the still-warm machine) brings .model_b.
# Usage on the machine:
#   bash benchmarks/run_fidelity_gpu.sh stash            # first call: keep half A
#   bash benchmarks/run_fidelity_gpu.sh run STEPS [ARGS] # later call: join, check, run
#   bash benchmarks/run_fidelity_gpu.sh finals           # later call, on two GPUs: the
#       issue-14 finalists on three texts, one process per configuration
#       (run_fidelity_parallel.py; the third text travels with the working tree), then,
#       if GREEDY_S > 0, the sharded greedy check with XLA's GEMM autotuning off
# Results go to $OUT/fidelity_results.tar.gz (the tool returns at most 8 files).
set -uo pipefail
MODEL_DIR=${MODEL_DIR:-/tmp/innerq_model}
mkdir -p "$MODEL_DIR"
case "${1:-}" in
  stash)
    cp .model_a/part "$MODEL_DIR/part_a" && echo "stashed half A in $MODEL_DIR"
    exit 0 ;;
  run) mode=run; shift; steps=${1:?steps}; shift ;;
  finals) mode=finals; shift ;;
  *) echo "usage: $0 stash | run STEPS [run_fidelity args] | finals" >&2; exit 2 ;;
esac
model="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$model" ]; then
  [ -f "$MODEL_DIR/part_a" ] || { echo "half A missing: the machine was not kept warm" >&2; exit 3; }
  cat "$MODEL_DIR/part_a" .model_b/part > "$model"
fi
echo "$(cut -d' ' -f1 .model_b/sha256)  $model" | sha256sum -c - || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
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

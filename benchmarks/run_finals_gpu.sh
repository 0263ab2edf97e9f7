#!/usr/bin/env bash
# The fidelity finals on the two-GPU machine, in the call after
# `bash benchmarks/run_fidelity_gpu.sh stash` (which keeps the model's first half warm):
# join the model, score the finalists on the three texts (one process per configuration,
# benchmarks/run_fidelity_parallel.py), then, if GREEDY_S > 0, the sharded greedy check
# with XLA's GEMM autotuning off (the same kernels in every compilation).
# Results: $OUT/finals.tar.gz (carry: .model_b, .whl, .evaldata).
set -uo pipefail
MODEL_DIR=${MODEL_DIR:-/tmp/innerq_model}
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
R=$OUT/res
mkdir -p "$R"
timeout "${FINALS_S:-400}" python3 benchmarks/run_fidelity_parallel.py --set "${SET:-finalists3}" \
  --tag finalists3 --gpus 2 --model "$model" --data-dir "$PWD/.evaldata" --out "$R" \
  > "$R/final_log.txt" 2>&1
echo "finals rc=$? (elapsed $SECONDS s)"
grep -E "rc=|^\| |^# " "$R/final_log.txt" | tail -45
if [ "${GREEDY_S:-0}" -gt 0 ]; then
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$GREEDY_S" python3 benchmarks/sharded_greedy_check.py \
    --model "$model" --mesh data=2 --new 96 --out "$R" --tag _noautotune \
    > "$R/greedy_noautotune_log.txt" 2>&1
  echo "greedy rc=$? (elapsed $SECONDS s)"; tail -5 "$R/greedy_noautotune_log.txt"
fi
tar -C "$OUT" -czf "$OUT/finals.tar.gz" res && rm -rf "$R"

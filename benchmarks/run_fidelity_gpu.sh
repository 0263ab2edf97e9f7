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
#   e.g. the issue-14 finals on three texts (the third, benchmarks/data/, travels with
#   the working tree): bash benchmarks/run_fidelity_gpu.sh run final,final2,final3
# Results go to $OUT/fidelity_results.tar.gz (the tool returns at most 8 files).
set -uo pipefail
MODEL_DIR=${MODEL_DIR:-/tmp/innerq_model}
mkdir -p "$MODEL_DIR"
case "${1:-}" in
  stash)
    cp .model_a/part "$MODEL_DIR/part_a" && echo "stashed half A in $MODEL_DIR"
    exit 0 ;;
  run) shift ;;
  *) echo "usage: $0 stash | run STEPS [run_fidelity args]" >&2; exit 2 ;;
esac
steps=${1:?steps}; shift
model="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$model" ]; then
  [ -f "$MODEL_DIR/part_a" ] || { echo "half A missing: the machine was not kept warm" >&2; exit 3; }
  cat "$MODEL_DIR/part_a" .model_b/part > "$model"
fi
echo "$(cut -d' ' -f1 .model_b/sha256)  $model" | sha256sum -c - || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
results=$OUT/results
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${FIDELITY_TIMEOUT:-540}" python3 benchmarks/run_fidelity.py --steps "$steps" \
  --model "$model" --data-dir "$PWD/.evaldata" --out "$results" --check-tag check_gpu "$@" \
  2>&1 | tee "$results/log_${steps//,/_}.txt"
rc=$?
tar -C "$OUT" -czf "$OUT/fidelity_results.tar.gz" results && rm -rf "$results"
exit $rc

#!/usr/bin/env bash
# The one-kernel cache write (pallas_kernels/cache_update.py) on one H200, in two calls
# on a warm machine (the default model travels in two halves, see gpu_model.sh):
#   call 1, carry .model_a:  bash benchmarks/run_writes_gpu.sh one
#       stash half A; the compiled kernel against the scatters (GPU tests) and the fp8
#       scale decode; end-to-end decode (Llama-3-8B shape, random weights) with the
#       InnerQ cache's writes as one kernel and as XLA scatters, beside bf16
#   call 2, carry .model_b .whl:  bash benchmarks/run_writes_gpu.sh two
#       the same on the SmolLM2 shape (launch-bound); the real model's greedy tokens as
#       one batch of 4 against two batches of 2 with each token's logit margin; the CLI
#       on the real model with each writer
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu_model.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
PY=python3
e2e() {  # tag, limit s, bench_e2e args...
  local tag=$1 lim=$2; shift 2
  timeout "$lim" $PY benchmarks/bench_e2e.py --out "$OUT" --tag "$tag" --writers pallas,scatter \
    --budget-s $((lim - 40)) "$@" > "$OUT/e2e_$tag.log" 2>&1
  echo "== e2e $tag rc=$? (elapsed $SECONDS s)"
  grep -A16 "^cache " "$OUT/e2e_$tag.log" | head -18
}
case "${1:-}" in
  one)
    stash_half_a
    { echo "# commit ${COMMIT:-unknown}"; nvidia-smi --query-gpu=name --format=csv,noheader; } \
      > "$OUT/writes_gpu_tests.txt"
    timeout 120 $PY -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_cache_update.py \
      "tests/test_kernels.py::test_fp8_scale_bits_decode_exactly" -rA >> "$OUT/writes_gpu_tests.txt" 2>&1
    echo "GPU tests rc=$? (elapsed $SECONDS s)"; tail -4 "$OUT/writes_gpu_tests.txt"
    e2e writes_h200_8b "${E2E_S:-400}" --suite decode,grid --only bf16:8,innerq2:8,bf16:1,innerq2:1
    ;;
  two)
    join_model || exit $?
    model=$MODEL
    e2e writes_h200_smollm2 "${SMOL_S:-150}" --model smollm2 --suite grid --only bf16:1,innerq2:1,bf16:8,innerq2:8
    timeout "${GREEDY_S:-150}" $PY benchmarks/sharded_greedy_check.py --model "$model" --mesh none \
      --new 96 --out "$OUT" --tag _h200 > "$OUT/greedy_margins_log.txt" 2>&1
    echo "== greedy margins rc=$? (elapsed $SECONDS s)"; tail -4 "$OUT/greedy_margins_log.txt"
    P="Explain in three sentences why the sky is blue, as you would to a ten-year-old."
    for w in pallas scatter; do
      INNERQ_CACHE_WRITER=$w timeout 60 $PY -m models.cli generate --model "$model" --no-stream \
        --max-new-tokens 256 "$P" > "$OUT/cli_recommended_$w.txt" 2>&1
      echo "== cli writer=$w rc=$? (elapsed $SECONDS s)"; grep -E "tokens generated" "$OUT/cli_recommended_$w.txt"
    done
    ;;
  *) echo "usage: $0 one | two" >&2; exit 2 ;;
esac

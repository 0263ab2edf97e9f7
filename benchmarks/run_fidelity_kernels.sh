#!/usr/bin/env bash
# The fused kernel on the fidelity search's cache families (H200): the compiled Triton
# kernel against the reference on the new layouts (GPU tests), then each candidate's
# fused decode attention at B 8 / 32k in the same run as InnerQ, OuterQ, InnerQ-H and the
# fastest bf16 kernel (bench_kernels cfg_fused@{CacheConfig.innerq overrides}).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_fidelity_kernels.sh
# (COMMIT names the tested code in the record: the machine's copy of .git can be stale)
#   SET=fp8   only the fp8-scale candidates beside InnerQ and the recommended cache
#   TESTS_S=0 skips the GPU tests
set -u
OUT=${OUT:-/tmp/out}
SET=${SET:-all}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [[ ${TESTS_S:-150} -gt 0 ]]; then
  { echo "# commit ${COMMIT:-unknown}; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    $PY -c 'import jax; print("# jax", jax.__version__)'; } > "$OUT/kernels_gpu_tests_layouts.txt"
  INNERQ_KERNEL_TESTS=gpu timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py -m "slow or not slow" \
    -k "Kt-Vt or Kd-Vd or fp8 or innerq2-G32-D128-gqa4 or outerq2-G32-D128-gqa4" \
    >> "$OUT/kernels_gpu_tests_layouts.txt" 2>&1
  echo "GPU tests rc=$? (elapsed $SECONDS s)"; tail -3 "$OUT/kernels_gpu_tests_layouts.txt"
fi
REC='"rotation": "keys_values", "sink": 36, "recent": 96'
K16='"key_group_size": 16, "key_scale_dtype": "float8_e4m3fn"'
G16='"group_size": 16, "scale_dtype": "float8_e4m3fn"'
if [[ $SET == fp8 ]]; then
  C=("{$REC}" "{$REC, $K16}" "{$REC, $G16}")
  V='"bf16_pallas", "innerq_fused"'
  TAG=_fp8_bitcast
else
  C=(
    "{$REC}"
    "{$REC, \"rotation_signs\": true}"
    "{$REC, $K16}"
    "{$REC, \"rotation_signs\": true, $K16}"
    "{\"sink\": 36, \"recent\": 96, \"k_axis\": \"t\"}"
    "{$REC, \"v_axis\": \"d\"}"
    "{$REC, $G16}"
  )
  V='"bf16_pallas", "innerq_fused", "outerq_fused", "innerq-h_fused"'
  TAG=_fidelity_candidates
fi
for c in "${C[@]}"; do V+=", $(python3 -c 'import json,sys; print(json.dumps("cfg_fused@" + sys.argv[1]))' "$c")"; done
timeout "${BENCH_S:-300}" $PY benchmarks/bench_kernels.py --suite points --tag "$TAG" \
  --out "$OUT" --reps 5 --points "[[8, 32768, {}, [$V]]]" > "$OUT/kernels$TAG.log" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)"
grep -E "ms|MISMATCH|FAILED" "$OUT/kernels$TAG.log" | tail -20

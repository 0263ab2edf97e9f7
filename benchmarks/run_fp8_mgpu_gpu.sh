#!/usr/bin/env bash
# One H200 call (<= 300 s): the fused Triton kernel on the fp8-scale layouts after their
# scales' decode became integer + bitcast (bench_kernels, B 8 / 32k, beside InnerQ and the
# recommended cache), then the Mosaic GPU kernel's windows-in-kernel point with the
# per-token copy pipeline and a 4-programs-per-SM point (mgpu_probe, kernel stage).
# Usage (repository root, on the GPU machine): bash benchmarks/run_fp8_mgpu_gpu.sh
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
REC='"rotation": "keys_values", "sink": 36, "recent": 96'
C=("{$REC}" "{$REC, \"key_group_size\": 16, \"key_scale_dtype\": \"float8_e4m3fn\"}"
   "{$REC, \"group_size\": 16, \"scale_dtype\": \"float8_e4m3fn\"}")
V='"bf16_pallas", "innerq_fused"'
for c in "${C[@]}"; do V+=", $($PY -c 'import json,sys; print(json.dumps("cfg_fused@" + sys.argv[1]))' "$c")"; done
timeout "${BENCH_S:-130}" $PY benchmarks/bench_kernels.py --suite points --tag _fp8_bitcast \
  --out "$OUT" --reps 5 --points "[[8, 32768, {}, [$V]]]" > "$OUT/kernels_fp8_bitcast.log" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)"
grep -E " ms |MISMATCH|FAILED" "$OUT/kernels_fp8_bitcast.log" | tail -8
timeout "${PROBE_S:-140}" $PY benchmarks/mgpu_probe.py --stage kernel --out "$OUT" --tag _4 \
  --points '[{"windows": "kernel", "explicit_barriers": true}, {"explicit_barriers": true, "ctas_per_sm": 4}]' \
  > "$OUT/mgpu_probe_4.log" 2>&1
echo "probe rc=$? (elapsed $SECONDS s)"
grep -E "op .* ms|rc=|Error" "$OUT/mgpu_probe_4.log" | tail -8

#!/usr/bin/env bash
# The last GPU call for the Mosaic GPU kernel (one call, <= 420 s): check the structural
# variants (each in its own process, so a hang costs one time limit), run the GPU tests on
# those that work, time the tunables, then bench_kernels beside the Triton kernel and the
# bf16 peers with the fastest checked point.
# Usage (repository root, on the GPU machine): bash benchmarks/run_mgpu_final.sh TAG
set -u
TAG=${1:-3}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-405}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv; git log -1 --format=%H 2>/dev/null; } > "$OUT/env_$TAG.txt" 2>&1

echo "== A: variant checks"
BULK='{"pipeline": "bulk", "explicit_barriers": true}'
WIN='{"windows": "kernel", "explicit_barriers": true}'
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout 50 $PY benchmarks/mgpu_probe.py --stage check \
  --points "[$BULK]" > /tmp/a_bulk.log 2>&1; echo "rc=$?" >> /tmp/a_bulk.log
timeout 50 $PY benchmarks/mgpu_probe.py --stage check --points "[$WIN]" > /tmp/a_win.log 2>&1
echo "rc=$?" >> /tmp/a_win.log
cat /tmp/a_bulk.log /tmp/a_win.log | gzip -c > "$OUT/stageA_$TAG.log.gz"
ok() { [[ $(grep -cE "rel err [0-9.]+e-0[3-9]" "$1") -ge 2 ]]; }
grep -E "^check|^rc=|registers|spill" /tmp/a_bulk.log /tmp/a_win.log | head -20
BULK_OK=0; WIN_OK=0
ok /tmp/a_bulk.log && BULK_OK=1
ok /tmp/a_win.log && WIN_OK=1
echo "bulk ok=$BULK_OK windows-in-kernel ok=$WIN_OK (elapsed $SECONDS s)"

echo "== T: GPU tests"
SEL="emit-xla"
[[ $BULK_OK == 1 && $WIN_OK == 1 ]] && SEL="emit-xla or bulk-kernel"
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_mgpu_kernels.py -rA -s -k "$SEL" \
  > "$OUT/gpu_tests_$TAG.txt" 2>&1; echo "stage T rc=$? (selection: $SEL)" >> "$OUT/gpu_tests_$TAG.txt"
grep -E "passed|failed|rel err|stage T" "$OUT/gpu_tests_$TAG.txt" | tail -22
echo "(elapsed $SECONDS s)"

echo "== K: tunables"
P='[{"explicit_barriers": true}'
if [[ $BULK_OK == 1 ]]; then
  P+=', {"pipeline": "bulk"}, {"pipeline": "bulk", "ablate": ["stream"]}'
  if [[ $WIN_OK == 1 ]]; then
    for o in '' ', "num_stages": 6' ', "num_stages": 3' ', "ctas_per_sm": 4' \
             ', "ctas_per_sm": 2, "num_stages": 8' ', "block_tokens": 256, "num_stages": 3'; do
      P+=", {\"pipeline\": \"bulk\", \"windows\": \"kernel\"$o}"
    done
  fi
elif [[ $WIN_OK == 1 ]]; then
  P+=', {"windows": "kernel", "explicit_barriers": true}, {"windows": "kernel", "explicit_barriers": true, "num_stages": 6}'
fi
P+=']'
timeout 125 $PY benchmarks/mgpu_probe.py --stage kernel --points "$P" --out "$OUT" --tag "_$TAG" \
  2>&1 | grep -vE "^\s+File|^\s{4}" | tail -24
echo "(elapsed $SECONDS s)"

BEST=$($PY benchmarks/mgpu_probe.py --stage best --out "$OUT" --tag "_$TAG")
echo "best point at B8/32k: $BEST"

LEFT=$((BUDGET - SECONDS - 10))
echo "== P: bench_kernels (limit $LEFT s)"
if [[ $LEFT -gt 30 ]]; then
  PEERS='["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu"]'
  TWO='["bf16_pallas", "innerq_mgpu"]'
  timeout $LEFT $PY benchmarks/bench_kernels.py --suite points --tag "_mgpu$TAG" --out "$OUT" --reps 5 \
    --options "{\"innerq_mgpu\": $BEST}" \
    --points "[[8, 32768, {}, $PEERS], [1, 131072, {}, $PEERS], [1, 4096, {}, $TWO],
               [8, 4096, {}, $TWO], [32, 16384, {}, $TWO], [8, 16384, {}, $TWO], [1, 32768, {}, $TWO],
               [8, 32768, {\"bits\": 4}, $TWO], [8, 32768, {\"G\": 64}, $TWO],
               [8, 8192, {\"Hq\": 32, \"Hkv\": 32, \"label\": \"MHA-B8-T8k-Hq32-Hkv32\"}, $TWO],
               [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"}, $TWO]]" \
    > /tmp/bench.log 2>&1; echo "stage P rc=$?" >> /tmp/bench.log
  grep -vE "^\s+File|^\s{4}" /tmp/bench.log | grep -E "ms|rc=|MISMATCH|FAILED|\[" | tail -40
  cp /tmp/bench.log "$OUT/bench_$TAG.log"
fi
echo "done (elapsed $SECONDS s)"

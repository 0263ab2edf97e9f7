#!/usr/bin/env bash
# One GPU call for the Mosaic GPU kernel: compile report, GPU tests, tunables, peers.
# Usage (repository root, on the GPU machine): bash benchmarks/run_mgpu_gpu.sh TAG [stages]
# stages: letters of A (check + ptxas/SASS report), T (GPU tests), K (kernel tunables),
# P (bench_kernels points beside the Triton kernel and the bf16 peers), F (full suite).
# Each stage has its own time limit so that a hang cannot take the whole call.
set -u
TAG=${1:-1}
STAGES=${2:-ATKP}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
POINTS=${MGPU_POINTS:-'[{}, {"num_stages": 3}, {"block_tokens": 256, "num_stages": 3}, {"ctas_per_sm": 2}, {"ctas_per_sm": 4}]'}
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv; $PY -c 'import jax; print(jax.__version__, jax.devices())'; } > "$OUT/env_$TAG.txt" 2>&1

if [[ $STAGES == *A* ]]; then
  echo "== A: check + compiler report"
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout 75 $PY benchmarks/mgpu_probe.py --stage check \
    > /tmp/stageA.log 2>&1; echo "stage A rc=$?" >> /tmp/stageA.log
  grep -E "^check|^nvdisasm|rc=|Error|error|warning" /tmp/stageA.log | head -40
  grep -iE "registers|spill|smem|stack" /tmp/stageA.log | head -20
  gzip -c /tmp/stageA.log > "$OUT/stageA_$TAG.log.gz"
  if [[ $(grep -c "rel err" /tmp/stageA.log) -lt 2 ]]; then
    echo "stage A did not check both shapes: stopping here to save device time"; exit 1
  fi
fi
if [[ $STAGES == *T* ]]; then
  echo "== T: GPU tests"
  timeout 110 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_mgpu_kernels.py -rA \
    > "$OUT/gpu_tests_$TAG.txt" 2>&1; echo "stage T rc=$?" >> "$OUT/gpu_tests_$TAG.txt"
  tail -15 "$OUT/gpu_tests_$TAG.txt"
fi
if [[ $STAGES == *K* ]]; then
  echo "== K: kernel tunables"
  timeout ${K_LIMIT:-100} $PY benchmarks/mgpu_probe.py --stage kernel --points "$POINTS" --out "$OUT" \
    --tag "_$TAG" 2>&1 | grep -vE "^\s+File|^\s{4}" | tail -30
fi
if [[ $STAGES == *P* ]]; then
  echo "== P: points beside the Triton kernel and the bf16 peers"
  timeout 120 $PY benchmarks/bench_kernels.py --suite points --tag "_mgpu$TAG" --out "$OUT" --reps 5 \
    --points '[[8, 32768, {}, ["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu"]],
               [1, 131072, {}, ["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu"]]]' \
    > /tmp/bench.log 2>&1; echo "stage P rc=$?" >> /tmp/bench.log
  grep -vE "^\s+File|^\s{4}" /tmp/bench.log | tail -14
  cp /tmp/bench.log "$OUT/bench_$TAG.log"
fi
if [[ $STAGES == *F* ]]; then
  echo "== F: full suite"
  timeout 400 $PY benchmarks/bench_kernels.py --suite full --tag "_mgpu$TAG" --out "$OUT" \
    > /tmp/full.log 2>&1; echo "stage F rc=$?" >> /tmp/full.log
  tail -30 /tmp/full.log
  cp /tmp/full.log "$OUT/full_$TAG.log"
fi

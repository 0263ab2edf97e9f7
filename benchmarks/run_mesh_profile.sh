#!/usr/bin/env bash
# Two-GPU decode profile (issue: two-GPU run): bench_e2e at B 8 / 32k for the bf16 and
# InnerQ caches on one GPU, model=2 and data=2, each step traced (--profile), so every row
# records device busy, collective and idle time per step beside ms/step.
# Usage (repository root, on the nvidia-h200-x2 machine): bash benchmarks/run_mesh_profile.sh
set -u
OUT=${OUT:-/tmp/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for spec in single data=1,model=2 data=2,model=1; do
  tag=prof_${spec//[=,]/}
  args=(--suite mesh --only "bf16:8,innerq2:8" --profile --out "$R" --tag "$tag")
  [[ $spec != single ]] && args+=(--mesh "$spec")
  timeout "${PER_MESH_S:-170}" python3 benchmarks/bench_e2e.py "${args[@]}" > "$R/$tag.log" 2>&1
  echo "== $spec rc=$? (elapsed $SECONDS s)"
  grep -A12 "^cache " "$R/$tag.log"
done
( cd "$R" && tar -czf "$OUT/traces.tar.gz" traces 2>/dev/null && rm -rf traces )
ls -la "$OUT" "$R"

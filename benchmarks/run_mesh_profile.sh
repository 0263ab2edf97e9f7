#!/usr/bin/env bash
# Two-GPU decode runs (issue: two-GPU run), bench_e2e at B 8 / 32k for the bf16 and InnerQ
# caches. Usage (repository root, on the nvidia-h200-x2 machine):
#   bash benchmarks/run_mesh_profile.sh          # one GPU, model=2 and data=2, each step
#       traced (--profile): device busy, collective and idle time per step beside ms/step
#   bash benchmarks/run_mesh_profile.sh flags    # model=2 under XLA's CUDA-graph settings
#       (default command buffers, collectives recorded too, command buffers off), one GPU beside
#   SPECS="data=1,model=2 single" bash benchmarks/run_mesh_profile.sh   # some meshes, in order
set -u
OUT=${OUT:-/tmp/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run() {  # tag, mesh (or single), XLA flags, extra bench_e2e args...
  local tag=$1 spec=$2 flags=$3; shift 3
  local args=(--suite mesh --only "bf16:8,innerq2:8" --out "$R" --tag "$tag" "$@")
  [[ $spec != single ]] && args+=(--mesh "$spec")
  XLA_FLAGS="$flags" timeout "${PER_RUN_S:-170}" python3 benchmarks/bench_e2e.py "${args[@]}" \
    > "$R/$tag.log" 2>&1
  echo "== $tag ($spec, XLA_FLAGS='$flags') rc=$? (elapsed $SECONDS s)"
  grep -A12 "^cache " "$R/$tag.log"
}
if [[ ${1:-profile} == flags ]]; then
  run tp2_default data=1,model=2 ""
  run tp2_cb_collectives data=1,model=2 "--xla_gpu_enable_command_buffer=+COLLECTIVES"
  run tp2_cb_off data=1,model=2 "--xla_gpu_enable_command_buffer="
  run single_default single ""
else
  for spec in ${SPECS:-single data=1,model=2 data=2,model=1}; do
    run "prof_${spec//[=,]/}" "$spec" "" --profile
  done
  ( cd "$R" && tar -czf "$OUT/traces.tar.gz" traces 2>/dev/null && rm -rf traces )
fi
ls -la "$OUT" "$R"

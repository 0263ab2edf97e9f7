# Sourced by the one-call GPU scripts (benchmarks/run_*.sh), from the repository root:
# strict variables, the output folder ($OUT, what the device tool brings back), the import
# path, and start_log FILE, which begins a log with the commit and the GPU's name, clocks
# and driver.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3

start_log() {
  { echo "# commit ${COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
  } > "$1"
}

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

# mosaic_gpu_tests FILE SELECTION [TIMEOUT_S]: the Mosaic GPU tests picked by pytest -k,
# compiled on the GPU, into FILE (headed by the log's commit and GPU lines); the summary
# goes to $LOG too
mosaic_gpu_tests() {
  head -2 "$LOG" > "$1"
  timeout "${3:-160}" $PY -m pytest -q -p no:cacheprovider -m gpu -rA \
    tests/test_mgpu_kernels.py -k "$2" >> "$1" 2>&1
  echo "Mosaic GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$1" "$LOG"
  grep -E "passed|failed" "$1" | tail -2 | tee -a "$LOG"
}

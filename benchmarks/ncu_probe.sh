#!/usr/bin/env bash
# Nsight Compute on the fused decode kernels at B 8 / 32k (benchmarks/ncu_driver.py; under
# ncu the benchmark script itself died with a segfault). Each kernel in its own process;
# the driver prints a line per step, so a crash shows where it happened.
# Usage (repository root, on the GPU machine): bash benchmarks/ncu_probe.sh [triton mgpu]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="--xla_gpu_enable_command_buffer="
NCU=$(command -v ncu)
LOG="$OUT/ncu_probe_log.txt"
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats --section ComputeWorkloadAnalysis"
python3 benchmarks/ncu_driver.py --save /tmp/inputs.npz --kernels none 2>&1 | tail -2 | tee -a "$LOG"
export XLA_FLAGS="$XLA_FLAGS --xla_gpu_autotune_level=0"
declare -A RX=([triton]=innerq_decode [mgpu]=mgpu_decode)
for k in ${@:-triton mgpu}; do
  timeout 150 "$NCU" --clock-control none -k "regex:${RX[$k]}" --launch-skip 1 --launch-count 1 $S \
    --import-source yes -f -o "$OUT/ncu_$k" python3 benchmarks/ncu_driver.py --load /tmp/inputs.npz --kernels $k \
    > /tmp/ncu_$k.log 2>&1
  echo "== $k rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -vE "^\s+File|^\s{4}" /tmp/ncu_$k.log | tail -12 | tee -a "$LOG"
  if [[ -f "$OUT/ncu_$k.ncu-rep" ]]; then
    "$NCU" -i "$OUT/ncu_$k.ncu-rep" --page details --csv > "$OUT/ncu_${k}_details.csv" 2>&1
    "$NCU" -i "$OUT/ncu_$k.ncu-rep" --page source --csv --print-source sass 2>&1 \
      | gzip -c > "$OUT/ncu_${k}_source.csv.gz"
    grep -E '"(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Issue Slots Busy|Issued Ipc Active|No Eligible|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction|Executed Instructions)"' \
      "$OUT/ncu_${k}_details.csv" | cut -c1-300 | tee -a "$LOG"
  fi
done
ls -la "$OUT" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 34, first profile call: Nsight Compute on the final Mosaic GPU kernel at B 8 / 32k
# (bf16 keys, the default, and the e4m3 keys), one launch each, then ncu_summary.py: the
# main loop's instructions per warp and block and its warp-state samples by instruction
# class and stall reason (round 5 was the last profile; rounds 8-13 changed the loop).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_enable_command_buffer="
NCU=$(command -v ncu)
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats --section ComputeWorkloadAnalysis"
$PY benchmarks/ncu_driver.py --save /tmp/inputs.npz --kernels none 2>&1 | tail -2 | tee -a "$LOG"
export XLA_FLAGS="$XLA_FLAGS --xla_gpu_autotune_level=0"
declare -A OPTS=([bf16keys]='{}' [e4m3keys]='{"key_format": "e4m3x2"}')
for v in bf16keys e4m3keys; do
  timeout 150 "$NCU" --clock-control none -k "regex:mgpu_decode" --launch-skip 1 --launch-count 1 $S \
    --import-source yes -f -o "/tmp/ncu_$v" $PY benchmarks/ncu_driver.py --load /tmp/inputs.npz \
    --kernels mgpu --options "${OPTS[$v]}" > "/tmp/ncu_$v.log" 2>&1
  echo "== $v rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "rel err|Error|error" "/tmp/ncu_$v.log" | tail -4 | tee -a "$LOG"
  if [[ -f "/tmp/ncu_$v.ncu-rep" ]]; then
    "$NCU" -i "/tmp/ncu_$v.ncu-rep" --page details --csv > "$OUT/ncu_round34_${v}_details.csv" 2>&1
    "$NCU" -i "/tmp/ncu_$v.ncu-rep" --page source --csv --print-source sass 2>&1 \
      | gzip -c > "$OUT/ncu_round34_${v}_source.csv.gz"
    $PY benchmarks/ncu_summary.py "$OUT/ncu_round34_${v}_source.csv.gz" \
      --details "$OUT/ncu_round34_${v}_details.csv" --out "$OUT/ncu_round34_${v}_summary" \
      --title "Mosaic GPU InnerQ kernel, $v, B 8 / 32k (H200, ncu)" 2>&1 | tee -a "$LOG"
  fi
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

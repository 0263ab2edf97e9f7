#!/usr/bin/env bash
# Round 34, second call: the lazy running maximum (rescale="lazy": the block's probabilities
# against the kept maximum, the exact reduction only where a score passes it by
# mgpu_block.LAZY_RESCALE). Its GPU tests on the whole grid, its SASS (registers: a fourth
# program per SM needs <= 128, more than 168 would drop to two), the op and the kernel alone
# at B 8 / 32k and B 1 / 128k beside the default in alternation (every point checked against
# the reference first), then its loop under Nsight Compute (ncu_summary.py, as run_round34.sh).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round34b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round34b_log.txt"
start_log "$LOG"
mosaic_gpu_tests "$OUT/round34b_gpu_tests.txt" "test_gpu_kernel_equals_reference and lazy" 200
mosaic_sass "$OUT/round34b_sass_lazy.log.gz" '[{"rescale": "lazy"}]'
mosaic_probe _round34b '[{}, {"rescale": "lazy"}, {"rescale": "lazy"}, {}]' 240
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_enable_command_buffer="
NCU=$(command -v ncu)
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section SourceCounters --section InstructionStats"
$PY benchmarks/ncu_driver.py --save /tmp/inputs.npz --kernels none 2>&1 | tail -1 | tee -a "$LOG"
export XLA_FLAGS="$XLA_FLAGS --xla_gpu_autotune_level=0"
v=lazy
timeout 120 "$NCU" --clock-control none -k "regex:mgpu_decode" --launch-skip 1 --launch-count 1 $S \
  --import-source yes -f -o "/tmp/ncu_$v" $PY benchmarks/ncu_driver.py --load /tmp/inputs.npz \
  --kernels mgpu --options '{"rescale": "lazy"}' > "/tmp/ncu_$v.log" 2>&1
echo "== ncu $v rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "rel err" "/tmp/ncu_$v.log" | tail -1 | tee -a "$LOG"
if [[ -f "/tmp/ncu_$v.ncu-rep" ]]; then
  "$NCU" -i "/tmp/ncu_$v.ncu-rep" --page details --csv > "$OUT/ncu_round34b_${v}_details.csv" 2>&1
  "$NCU" -i "/tmp/ncu_$v.ncu-rep" --page source --csv --print-source sass 2>&1 \
    | gzip -c > "$OUT/ncu_round34b_${v}_source.csv.gz"
  $PY benchmarks/ncu_summary.py "$OUT/ncu_round34b_${v}_source.csv.gz" \
    --details "$OUT/ncu_round34b_${v}_details.csv" --out "$OUT/ncu_round34b_${v}_summary" \
    --title "Mosaic GPU InnerQ kernel, rescale=lazy, B 8 / 32k (H200, ncu)" 2>&1 | tee -a "$LOG"
fi
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

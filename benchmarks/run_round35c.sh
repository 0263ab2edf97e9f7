#!/usr/bin/env bash
# Round 35, third call: the final kernel (the tuned default: the lazy maximum, no multiply on
# its common side) under Nsight Compute, as round 34b profiled the lazy option (ncu_loop:
# B 8 / 32k, one launch; ncu_summary.py's loop by instruction class and stall reason).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round35c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round35c_log.txt"
start_log "$LOG"
ncu_loop round35c_final '{}' \
  "--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section SourceCounters --section InstructionStats"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

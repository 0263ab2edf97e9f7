#!/usr/bin/env bash
# Which jax programs Nsight Compute can profile on the GPU machine (it segfaulted on the
# fused-kernel benchmark): an XLA reduction, a trivial Pallas Triton kernel, a trivial
# Mosaic GPU kernel, then the real fused kernels with application replay.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="--xla_gpu_enable_command_buffer="
NCU=$(command -v ncu)
LOG="$OUT/ncu_probe_log.txt"
S="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats"
cat > /tmp/p_xla.py <<'PY'
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.PRNGKey(0), (1 << 24,))
print(float(jax.jit(lambda x: jnp.sum(x * x))(x)))
PY
cat > /tmp/p_triton.py <<'PY'
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
def k(x_ref, o_ref): o_ref[...] = x_ref[...] * 2.0
x = jnp.arange(1024, dtype=jnp.float32)
f = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name="probe_triton")
print(float(jax.jit(f)(x).sum()))
PY
for p in xla triton; do
  timeout 90 "$NCU" --clock-control none $S -f -o "/tmp/ncu_$p" python3 /tmp/p_$p.py > /tmp/ncu_$p.log 2>&1
  echo "== $p rc=$?" | tee -a "$LOG"; grep -E "==PROF==|==ERROR==|Segmentation|^[0-9.]+$" /tmp/ncu_$p.log | head -8 | tee -a "$LOG"
done
P='[[8, 32768, {}, ["innerq_fused", "innerq_mgpu"]]]'
for k in innerq_decode mgpu_decode; do
  for mode in kernel application; do
    [[ $mode == application && $k == mgpu_decode ]] && continue
    timeout $([[ $mode == kernel ]] && echo 90 || echo 240) "$NCU" --clock-control none --replay-mode $mode -k "regex:$k" --launch-count 1 $S \
      --import-source yes -f -o "$OUT/ncu_${k}_$mode" \
      python3 benchmarks/bench_kernels.py --suite points --calls 1 --reps 1 --out /tmp/nb --points "$P" \
      > /tmp/ncu_$k.log 2>&1
    rc=$?
    echo "== $k $mode rc=$rc (elapsed $SECONDS s)" | tee -a "$LOG"
    grep -E "==PROF==|==ERROR==|Segmentation" /tmp/ncu_$k.log | head -6 | tee -a "$LOG"
    if [[ -f "$OUT/ncu_${k}_$mode.ncu-rep" ]]; then
      "$NCU" -i "$OUT/ncu_${k}_$mode.ncu-rep" --page details --csv > "$OUT/ncu_${k}_details.csv" 2>&1
      "$NCU" -i "$OUT/ncu_${k}_$mode.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip -c > "$OUT/ncu_${k}_source.csv.gz"
      break
    fi
  done
done
ls -la "$OUT" | tee -a "$LOG"

# Sourced by the one-call GPU scripts (benchmarks/run_*.sh), from the repository root:
# strict variables, the output folder ($OUT, what the device tool brings back), the import
# path, and start_log FILE, which begins a log with the commit and the GPU's name, clocks
# and driver.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 INNERQ_TEST_XLA_OPT=full  # tests/conftest.py
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
  WORKERS=0 gpu_tests "$1" "${3:-160}" tests/test_mgpu_kernels.py -k "$2"
}

# gpu_tests FILE TIMEOUT_S PYTEST_ARGS...: every -m gpu test PYTEST_ARGS select, $WORKERS
# pytest workers sharing the GPU (default 8, 0: one process; no preallocation), into FILE
# (headed by the log's commit and GPU lines); the summary and any failures to $LOG too
gpu_tests() {
  local file=$1 t=$2 workers=${WORKERS:-8}; shift 2
  head -2 "$LOG" > "$file"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$t" $PY -m pytest -q -p no:cacheprovider \
    -m gpu -rA $([ "$workers" -gt 0 ] && echo "-n $workers") "$@" >> "$file" 2>&1
  echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "passed|failed" "$file" | tail -2 | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)" "$file" | head -10 | tee -a "$LOG"
}

# every_gpu_test FILE [TIMEOUT_S]: every -m gpu test of tests/ into FILE (gpu_tests), the
# three modules that hold none and import gguf (absent on the GPU machine) left out
every_gpu_test() {
  gpu_tests "$1" "${2:-200}" tests --ignore=tests/test_weights.py \
    --ignore=tests/test_evaluate.py --ignore=tests/test_cli.py
}

# triton_gpu_tests FILE SELECTION [TIMEOUT_S] [TEST_FILE]: the Triton kernel tests of TEST_FILE
# (default tests/test_query_prep.py, slow ones included) picked by pytest -k, compiled on the
# GPU (INNERQ_KERNEL_TESTS=gpu), into FILE headed like the log; the summary to $LOG too
triton_gpu_tests() {
  head -2 "$LOG" > "$1"
  INNERQ_KERNEL_TESTS=gpu timeout "${3:-120}" $PY -m pytest -q -p no:cacheprovider -m "" -rA \
    "${4:-tests/test_query_prep.py}" -k "$2" >> "$1" 2>&1
  echo "Triton GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$1" "$LOG"
  grep -E "passed|failed" "$1" | tail -2 | tee -a "$LOG"
}

# mosaic_sass FILE.gz [POINTS]: the compiled Mosaic GPU kernel's SASS and ptxas report (one
# checked run of mgpu_probe.py per option point, default the tuned one), gzipped into
# FILE.gz; registers, spills and opcode counts to $LOG
mosaic_sass() {
  echo "== SASS of the compiled kernel" | tee -a "$LOG"
  MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 $PY benchmarks/mgpu_probe.py \
    --stage check --points "${2:-[{\}]}" > /tmp/check.log 2>&1
  grep -E "^check|registers|spill" /tmp/check.log | head -12 | tee -a "$LOG"
  for op in LOP3 FFMA FMUL FADD IMAD HGMMA SHF PRMT FSEL R2UR UMOV; do
    printf "%s %s\n" "$op" "$(grep -cE "^\s*/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T]+\s+)?$op" /tmp/check.log)"
  done | tee -a "$LOG"
  gzip -c /tmp/check.log > "$1"
}

# mosaic_probe TAG POINTS [TIMEOUT_S]: kernel-alone and op timings of the Mosaic GPU op's
# option points at B 8 / 32k and B 1 / 128k (mgpu_probe.py, $OUT/mgpu_probe<TAG>.json)
mosaic_probe() {
  timeout "${3:-120}" $PY benchmarks/mgpu_probe.py --stage kernel --points "$2" --out "$OUT" \
    --tag "$1" 2>&1 | grep -E " op |FAILED" | tee -a "$LOG"
  echo "probe done (elapsed $SECONDS s)" | tee -a "$LOG"
}

# kernel_suite TAG TIMEOUT_S: bench_kernels.py's whole suite into $OUT/kernels_full<TAG>.
# {json,png,_log.txt} (a run its limit cuts leaves its finished shapes: bench_kernels.py
# --merge completes it); its last shape lines to $LOG
kernel_suite() {
  local log="$OUT/kernels_full$1_log.txt"
  timeout "$2" $PY benchmarks/bench_kernels.py --suite full --tag "$1" --out "$OUT" --reps 5 \
    > "$log" 2>&1
  echo "suite rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^\[|elapsed" "$log" | tail -4 >> "$LOG"
}

# kernel_points TAG POINTS [TIMEOUT_S]: bench_kernels.py's points suite (every point checked
# against the reference, then timed) into $OUT/kernels_points<TAG>.{json,png,_log.txt}; its
# timing lines to $LOG
kernel_points() {
  local log="$OUT/kernels_points$1_log.txt"
  timeout "${3:-300}" $PY benchmarks/bench_kernels.py --suite points --tag "$1" --out "$OUT" \
    --reps 5 --points "$2" > "$log" 2>&1
  echo "bench rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^\[| ms |MISMATCH|FAILED" "$log" | grep -vE "^\s+File" >> "$LOG"
}

# e2e_rows TAG TIMEOUT_S ALLLOG ARGS...: bench_e2e.py's decode suite with ARGS into
# $OUT/e2e_h200_round<TAG>.json; its rows to $LOG, its whole output appended to ALLLOG
e2e_rows() {
  local tag=$1 t=$2 all=$3; shift 3
  echo "== $tag: $*" | tee -a "$LOG"
  timeout "$t" $PY benchmarks/bench_e2e.py --suite decode --tag "h200_round$tag" \
    --out "$OUT" "$@" > "/tmp/e2e_$tag.txt" 2>&1
  echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^(bf16|innerq2|recommended)|Error|error" "/tmp/e2e_$tag.txt" | grep -v "^{" \
    | tail -8 | cut -c1-300 | tee -a "$LOG"
  cat "/tmp/e2e_$tag.txt" >> "$all"
}

# step_rows TAG TIMEOUT_S ONLY [ARGS...]: the default model's step (SmolLM2 shape, --suite cli,
# B 1 / 1k) for the caches ONLY (kind:B,...), 20 greedy steps in one device loop, traced,
# into $OUT/e2e_h200_round<TAG>.json (e2e_rows), then each row's profile ($TOP costliest ops,
# default 10) to $LOG
step_rows() {
  local tag=$1 t=$2 only=$3; shift 3
  e2e_rows "$tag" "$t" "$OUT/e2e_h200_round${tag}_log.txt" --model smollm2 --suite cli \
    --only "$only" --call loop --steps 20 --profile "$@"
  profile_summary "$OUT/e2e_h200_round$tag.json" "${TOP:-10}"
}

# generate_rows TAG TIMEOUT_S ARGS...: bench_generate.py on the SmolLM2 shape with ARGS into
# $OUT/generate_h200_smollm2_round<TAG>.json; its output (rows, table, --profile's ops) to $LOG
generate_rows() {
  local tag=$1 t=$2; shift 2
  timeout "$t" $PY benchmarks/bench_generate.py --model smollm2 \
    --tag "h200_smollm2_round$tag" --out "$OUT" "$@" > /tmp/gen.txt 2>&1
  echo "bench_generate rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -vE "^\{|Warning|warn" /tmp/gen.txt | tail -90 | cut -c1-200 | tee -a "$LOG"
}

# profile_summary JSON [N]: each row's device busy time, kernels per step and N costliest
# ops (bench_e2e.py --profile) to $LOG
profile_summary() {
  $PY - "$1" "${2:-8}" <<'PY' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    for dev, p in (r.get("profile") or {}).items():
        print(f"== {r['cache']} {dev}: busy {p.get('busy_ms', 0):.2f} ms, "
              f"{p.get('ops', 0):.0f} kernels per step")
        for name, (k, ms) in list(p.get("by_op", {}).items())[: int(sys.argv[2])]:
            print(f"   {ms:8.4f} ms  x{k:5.0f}  {name}")
PY
}

# trace_op TAG SHAPES OPTIONS [OPS]: bench_kernels.py's trace suite (device time per call,
# every point checked first) of OPS (default ["innerq_fused"]) with the fused op's OPTIONS at
# SHAPES (JSON [[B, T, {Shape kwargs}], ...]) into $OUT/kernels_trace<TAG>.json; its lines to
# $LOG
trace_op() {
  echo "== $1 $3" | tee -a "$LOG"
  timeout "${TRACE_S:-70}" $PY benchmarks/bench_kernels.py --suite trace --tag "$1" --out "$OUT" \
    --reps 5 --options "{\"ops\": ${4:-[\"innerq_fused\"]}, \"innerq_fused\": $3}" \
    --shapes "$2" 2>&1 | grep -E "one set|rotating|MISMATCH|FAILED|Error" \
    | grep -v "^\s*[0-9.]* us  x" | tee -a "$LOG"
}

# trace_suite TAG SHAPES OPTIONS [TIMEOUT_S]: bench_kernels.py's trace suite with the whole
# --options JSON given (ops by name, "inputs", points ...; trace_op sets only the fused op's
# options) at SHAPES into $OUT/kernels_trace<TAG>.json; each point's lines to $LOG
trace_suite() {
  timeout "${4:-300}" $PY benchmarks/bench_kernels.py --suite trace --tag "$1" --out "$OUT" \
    --reps 5 --options "$3" --shapes "$2" 2>&1 \
    | grep -E "rotating|one set|MISMATCH|FAILED|Error" | tee -a "$LOG"
}

# ncu_loop NAME OPTIONS_JSON [SECTIONS]: Nsight Compute on one launch of the Mosaic GPU kernel at
# B 8 / 32k with these options (ncu_driver.py; its inputs saved once per call in
# /tmp/inputs.npz), the details and source pages as CSV into $OUT/ncu_NAME_{details.csv,
# source.csv.gz}, and ncu_summary.py's loop by class and stall into $OUT/ncu_NAME_summary.*
NCU_SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats --section ComputeWorkloadAnalysis"
ncu_loop() {
  local name=$1 opts=$2 ncu
  ncu=$(command -v ncu)
  (
    export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_enable_command_buffer="
    [ -f /tmp/inputs.npz ] || $PY benchmarks/ncu_driver.py --save /tmp/inputs.npz --kernels none 2>&1 | tail -1 | tee -a "$LOG"
    export XLA_FLAGS="$XLA_FLAGS --xla_gpu_autotune_level=0"
    timeout 150 "$ncu" --clock-control none -k "regex:mgpu_decode" --launch-skip 1 --launch-count 1 \
      ${3:-$NCU_SECTIONS} --import-source yes -f -o "/tmp/ncu_$name" $PY benchmarks/ncu_driver.py \
      --load /tmp/inputs.npz --kernels mgpu --options "$opts" > "/tmp/ncu_$name.log" 2>&1
    echo "== ncu $name rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
    grep -E "rel err|Error" "/tmp/ncu_$name.log" | tail -2 | tee -a "$LOG"
    [ -f "/tmp/ncu_$name.ncu-rep" ] || exit 0
    "$ncu" -i "/tmp/ncu_$name.ncu-rep" --page details --csv > "$OUT/ncu_${name}_details.csv" 2>&1
    "$ncu" -i "/tmp/ncu_$name.ncu-rep" --page source --csv --print-source sass 2>&1 \
      | gzip -c > "$OUT/ncu_${name}_source.csv.gz"
    $PY benchmarks/ncu_summary.py "$OUT/ncu_${name}_source.csv.gz" \
      --details "$OUT/ncu_${name}_details.csv" --out "$OUT/ncu_${name}_summary" \
      --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
      --title "Mosaic GPU InnerQ kernel, $name, B 8 / 32k (H200, ncu)" 2>&1 | tee -a "$LOG"
  )
}

# record_and_targets NAME VARIANTS_JSON: every -m gpu test into $OUT/NAME_gpu_tests.txt (skipped
# with SKIP_TESTS=1), then the two target shapes (B 8 / 32k, B 1 / 128k) with these variants in
# one process into $OUT/kernels_points_NAME.* (POINTS replaces the shapes, BENCH_S the limit)
record_and_targets() {
  local name=$1 variants=$2
  [ "${SKIP_TESTS:-0}" = 1 ] || every_gpu_test "$OUT/${name}_gpu_tests.txt" 300
  local points="[[8, 32768, {}, $variants], [1, 131072, {}, $variants]]"
  kernel_points "_$name" "${POINTS:-$points}" "${BENCH_S:-240}"
}

#!/usr/bin/env bash
# Round 12, second H200 call. The first (run_round12.sh) put the flush groups' quantization
# in the write kernel: 553 kernels per 8B-shape step instead of 1,381, but the kernel took
# 55 us per layer (64 programs, both groups in one program, 3-d tiles), so the device time
# did not move. Now each group is its own program on 2-d tiles ([rows, G]); this call
# times one layer's append per variant (bench_append.py: XLA quantization + write kernel
# against the kernel at 1/2/4/8 warps), runs the kernel's GPU tests, then the 8B shape at
# B 8 / 32k with the fastest warp count: a profile, then one call per step and 20 greedy
# steps per call against the round-11 append (writer pallas-rows), bf16 beside.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round12b.sh
# (Its shell helpers moved to gpu_env.sh after the run: e2e_rows, profile_summary; the
# commands they run are the same.)
source benchmarks/gpu_env.sh
LOG="$OUT/round12b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

timeout "${APPEND_S:-150}" $PY benchmarks/bench_append.py --out "$OUT" --tag h200_round12b \
  > /tmp/append.txt 2>&1
echo "append rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -14 /tmp/append.txt | tee -a "$LOG"
W=$($PY - "$OUT/append_h200_round12b.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"]
        if r["variant"].startswith("pallas/w") and r["check"] == "ok" and r["config"] == "innerq"]
print(min(rows, key=lambda r: r["us_per_append"])["variant"][8:] if rows else 4)
PY
)
export INNERQ_GROUP_WARPS=${W:-4}
echo "== warps for the e2e: $INNERQ_GROUP_WARPS" | tee -a "$LOG"

head -2 "$LOG" > "$OUT/round12b_gpu_tests.txt"
timeout "${TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider -m "" -rA \
  tests/test_cache_update.py >> "$OUT/round12b_gpu_tests.txt" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "passed|failed" "$OUT/round12b_gpu_tests.txt" | tail -3 | tee -a "$LOG"

e2e_rows 12d "${D_S:-90}" "$OUT/e2e_h200_round12b_log.txt" \
  --only innerq2:8 --call bound --profile --steps 10 --budget-s 70
profile_summary "$OUT/e2e_h200_round12d.json"
rm -rf "$OUT/traces" "$OUT/e2e_h200_round12d.png"
e2e_rows 12e "${E_S:-190}" "$OUT/e2e_h200_round12b_log.txt" \
  --only innerq2:8,bf16:8 --writers auto,pallas-rows --call bound,loop \
  --steps 20 --budget-s 170
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

#!/usr/bin/env bash
# Round 12, third H200 call. Round 12b measured one layer's append at B 8 (bench_append.py):
# XLA's quantization + write kernel 47.8 us, the kernel quantizing the groups itself at
# 1/2/4/8 warps 160 / 60 / 34.7 / 13.5 us; its e2e ran at 4 warps. Now 8 is the default:
# the append at 8 and 16 warps for both caches, then the 8B shape at B 8 / 32k (InnerQ, the
# recommended cache and bf16, one call per step and 20 greedy steps per call) and a profile.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round12c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round12c_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

timeout "${APPEND_S:-130}" $PY benchmarks/bench_append.py --out "$OUT" --tag h200_round12c \
  --warps 8,16 --reps 5 > /tmp/append.txt 2>&1
echo "append rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -9 /tmp/append.txt | tee -a "$LOG"

e2e() {  # TAG TIMEOUT ARGS...
  local tag=$1 t=$2; shift 2
  echo "== $tag: $*" | tee -a "$LOG"
  timeout "$t" $PY benchmarks/bench_e2e.py --suite decode --tag "h200_round12$tag" \
    --out "$OUT" "$@" > /tmp/e2e_$tag.txt 2>&1
  echo "rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
  grep -E "^(bf16|innerq2|recommended)|Error|error" /tmp/e2e_$tag.txt | grep -v "^{" | tail -8 \
    | cut -c1-300 | tee -a "$LOG"
  cat /tmp/e2e_$tag.txt >> "$OUT/e2e_h200_round12c_log.txt"
}
e2e f "${F_S:-190}" --only innerq2:8,recommended:8,bf16:8 --call bound,loop --steps 20 \
  --budget-s 170
e2e g "${G_S:-80}" --only innerq2:8 --call bound --profile --steps 10 --budget-s 60
$PY - "$OUT/e2e_h200_round12g.json" <<'PY' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    for dev, p in (r.get("profile") or {}).items():
        print(f"== {r['cache']} {dev}: busy {p.get('busy_ms', 0):.2f} ms, {p.get('ops', 0):.0f} kernels per step")
        for name, (k, ms) in list(p.get("by_op", {}).items())[:8]:
            print(f"   {ms:8.4f} ms  x{k:5.0f}  {name}")
PY
rm -rf "$OUT/traces" "$OUT/e2e_h200_round12g.png"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

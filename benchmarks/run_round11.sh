#!/usr/bin/env bash
# Round 11, first H200 call: why the paper's InnerQ step (innerq2) ran 14.65 ms at B 8 / 32k
# in round 10 while the recommended cache, with the same attention time, ran 10.26. Both
# rows of the Llama-3-8B shape end to end with a profile (device busy time and every op's
# time per step, in the JSON) and the compiled step's optimized HLO (where XLA copies).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round11.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round11_log.txt"
start_log "$LOG"

timeout "${E2E_S:-300}" $PY benchmarks/bench_e2e.py --suite decode \
  --only innerq2:8,recommended:8 --profile --hlo --tag h200_round11 --out "$OUT" \
  --budget-s 240 > "$OUT/e2e_h200_round11_log.txt" 2>&1
echo "e2e rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -9 "$OUT/e2e_h200_round11_log.txt" | tee -a "$LOG"
$PY - "$OUT/e2e_h200_round11.json" <<'PY' | tee -a "$LOG"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    for dev, p in (r.get("profile") or {}).items():
        print(f"== {r['cache']} {dev}: busy {p.get('busy_ms', 0):.2f} span {p.get('span_ms', 0):.2f} ms")
        for name, (n, ms) in list(p.get("by_op", {}).items())[:25]:
            print(f"   {ms:8.4f} ms  x{n:5.0f}  {name}")
PY
for f in "$OUT"/hlo/*.hlo.gz; do
  echo "== copies in $(basename "$f")" | tee -a "$LOG"
  zcat "$f" | grep -E "= [^ ]+ copy\(" | sed -E 's/, metadata.*//' | sort | uniq -c \
    | sort -rn | head -12 | tee -a "$LOG"
done
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

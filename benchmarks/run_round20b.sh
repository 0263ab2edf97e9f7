#!/usr/bin/env bash
# Round 20b (one H200 call): where a one-call-per-token step's host time goes. The host cost
# per argument array of a jitted call (host_overhead.py), the default model's B 1 / 1k step
# traced with its host events (bf16, InnerQ), and the same steps with XLA's command buffers
# (CUDA graphs) off.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round20b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round20b_log.txt"
start_log "$LOG"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout 120 $PY benchmarks/host_overhead.py --out "$OUT" > "$OUT/host_overhead_log.txt" 2>&1
echo "host_overhead rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -13 "$OUT/host_overhead_log.txt" | tee -a "$LOG"
e2e_rows 20host "${HOST_S:-120}" "$OUT/e2e_h200_round20host_log.txt" --model smollm2 \
  --suite cli --only bf16:1,innerq2:1 --steps 5 --profile --budget-s 100
$PY - "$OUT/e2e_h200_round20host.json" <<'PY' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"== host, {r['cache']}: call {r.get('host_call_ms', 0):.2f} ms")
    for name, (k, ms) in list((r.get("host_trace") or {}).items())[:25]:
        print(f"   {ms:8.4f} ms  x{k:6.1f}  {name}")
PY
rm -rf "$OUT/traces"
XLA_FLAGS="--xla_gpu_enable_command_buffer=" e2e_rows 20nocb "${NOCB_S:-90}" \
  "$OUT/e2e_h200_round20nocb_log.txt" --model smollm2 --suite cli --only bf16:1,innerq2:1 \
  --steps 20 --budget-s 70
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

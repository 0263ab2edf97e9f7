#!/usr/bin/env bash
# Round 22c (one H200 call) at the window programs' default: (1) the recommended cache (the
# CLI's: InnerQ-H, 36 sinks, 96 recent) through the dispatch at SmolLM2 B 1 / 1k, the
# query's rotation in XLA (default) and in the kernel's programs, beside the paper's InnerQ
# and jax's bf16 Pallas kernel, by device time; (2) InnerQ-H against InnerQ through the
# dispatch at B 8 / 32k and B 1 / 128k (the 5% target); (3) generate's time per token by the
# difference of two runs (96 and 32 new tokens, a 1k cache), bf16, InnerQ, recommended.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round22c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round22c_log.txt"
start_log "$LOG"
TRACE_S=90 trace_op _round22c_1k '[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}]]' \
  '{}' '["recommended_dispatch", "innerq_dispatch", "bf16_pallas"], "inputs": ["rotating"],
  "points_op": "recommended_dispatch", "points": [{}, {"rotate_query": "kernel"}]'
TRACE_S=120 trace_op _round22c_long '[[8, 32768, {}], [1, 131072, {}]]' '{}' \
  '["innerq_dispatch", "innerq-h_dispatch"], "inputs": ["rotating"]'
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout "${GEN_S:-200}" $PY benchmarks/bench_generate.py --model smollm2 \
  --caches bf16,innerq2,recommended --prompt 928 --new 96 --short 32 \
  --tag h200_smollm2_round22c --out "$OUT" > /tmp/gen.txt 2>&1
echo "bench_generate rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
grep -E "ms per token|^cache|^bf16|^innerq2|^recommended|Error" /tmp/gen.txt | tee -a "$LOG"
rm -rf "$OUT/traces" "$OUT"/kernels_trace_round22c_*.png "$OUT"/generate_h200_smollm2_round22c.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

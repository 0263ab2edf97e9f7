#!/usr/bin/env bash
# Round 31, fourth H200 call: run_round31c.sh's short shapes by device time again, the paper's
# InnerQ through the dispatch beside both bf16 peers, jax's Pallas kernel and cuDNN's (the
# bf16 path a model's step runs), each point checked against its reference first
# (the closest shapes first: the JSON is written after each shape).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round31d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round31d_log.txt"
start_log "$LOG"
SMOL='"Hq": 9, "Hkv": 3, "D": 64'
SHAPES="[[1, 1024, {$SMOL, \"label\": \"SmolLM2-B1-T1k\"}], [1, 4096, {}],
  [8, 8192, {$SMOL, \"label\": \"SmolLM2-B8-T8k\"}], [8, 4096, {}], [1, 32768, {}]]"
OPTS='{"ops": ["innerq_dispatch", "cudnn", "bf16_pallas"], "inputs": ["rotating"]}'
trace_suite _round31d "$SHAPES" "$OPTS" "${TRACE_S:-300}"
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

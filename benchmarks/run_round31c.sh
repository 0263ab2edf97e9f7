#!/usr/bin/env bash
# Round 31, third H200 call: the suite's short shapes, where the timed figure (rounds 17 and
# 31) is the host's per-argument work more than the kernels', by device time (the trace
# suite: each point checked against its reference first, then timed and traced over the
# rotating input sets): the paper's InnerQ and the recommended cache through the dispatch
# (the model's query in, its output out) beside jax's bf16 Pallas kernel.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round31c.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round31c_log.txt"
start_log "$LOG"
SMOL='"Hq": 9, "Hkv": 3, "D": 64'
SHAPES="[[1, 4096, {}], [8, 4096, {}], [1, 32768, {}],
  [8, 8192, {$SMOL, \"label\": \"SmolLM2-B8-T8k\"}], [1, 1024, {$SMOL, \"label\": \"SmolLM2-B1-T1k\"}]]"
OPTS='{"ops": ["innerq_dispatch", "recommended_dispatch", "bf16_pallas"], "inputs": ["rotating"]}'
trace_suite _round31c "$SHAPES" "$OPTS" "${TRACE_S:-420}"
rm -rf "$OUT/traces"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

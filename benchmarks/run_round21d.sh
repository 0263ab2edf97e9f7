#!/usr/bin/env bash
# Round 21d (one H200 call): the fused Triton op's split rule with one block per program
# where all blocks fit in one wave of the SMs. (1) By device time at SmolLM2 B 1 / 1k and
# 4k: the new default against the old rule's split counts (3 at 1k, 15 at 4k). (2) The
# default model's step in a device loop (B 1 / 1k, bf16 and InnerQ), with the compiled HLO.
# (As run at 12f934f, but for a first step that selected no test, -m gpu over four modules
# that hold none, left out here; the GPU record of that change is run_round21e.sh's.)
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round21d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round21d_log.txt"
start_log "$LOG"
S1='[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}]]'
S4='[[1, 4096, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T4k"}]]'
trace_op _round21d_new1k "$S1" '{}'
trace_op _round21d_old1k "$S1" '{"num_splits": 3}'
trace_op _round21d_new4k "$S4" '{}'
trace_op _round21d_old4k "$S4" '{"num_splits": 15}'
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
e2e_rows 21d "${E2E_S:-150}" /tmp/e2e_21d_all.txt --model smollm2 \
  --suite cli --only bf16:1,innerq2:1 --call loop,bound --steps 20 --hlo --budget-s 130
mv "$OUT"/hlo/*innerq2_loop*.hlo.gz "$OUT/round21d_innerq2_loop.hlo.gz" 2>/dev/null
rm -rf "$OUT/hlo" "$OUT"/kernels_trace_round21d_*.png "$OUT"/e2e_h200_round21d.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

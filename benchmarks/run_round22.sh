#!/usr/bin/env bash
# Round 22 (one H200 call): where the fused Triton op's time goes at one short stream, and
# the window and merge variants. By device time (bench_kernels.py --suite trace, rotating
# inputs, every point checked against the reference first): at SmolLM2 B 1 / 1k the op's
# ablations (no windows, no merge, no quantized loop, neither) and its points (window
# programs 1 / 2 / 3, window rows 128, 64-token blocks), beside jax's bf16 Pallas kernel;
# fewer points at SmolLM2 B 1 / 4k and the 8B shape's B 1 / 4k. Then the compiled fused
# kernel's tests (the new window programs and the stepped merge among them).
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round22.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round22_log.txt"
start_log "$LOG"
sweep() {  # TAG TIMEOUT_S SHAPES OPTIONS
  echo "== $1 $4" | tee -a "$LOG"
  timeout "$2" $PY benchmarks/bench_kernels.py --suite trace --tag "$1" --out "$OUT" --reps 5 \
    --options "$4" --shapes "$3" 2>&1 | grep -E "rotating|MISMATCH|FAILED|Error" \
    | grep -v "^\s*[0-9.]* us  x" | tee -a "$LOG"
  echo "rc=${PIPESTATUS[0]} (elapsed $SECONDS s)" | tee -a "$LOG"
}
S1='[[1, 1024, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T1k"}]]'
S4='[[1, 4096, {"Hq": 9, "Hkv": 3, "D": 64, "label": "SmolLM2-B1-T4k"}]]'
L4='[[1, 4096, {}]]'
sweep _round22_1k 230 "$S1" '{"ops": ["innerq_fused", "bf16_pallas"], "inputs": ["rotating"],
  "points": [{}, {"window_programs": 2}, {"window_programs": 3},
             {"window_programs": 2, "window_rows": 128}, {"block_tokens": 64},
             {"block_tokens": 64, "window_programs": 3}],
  "ablations": ["no_windows", "no_combine", "no_quantized", "no_quantized+no_windows"]}'
sweep _round22_4k 120 "$S4" '{"ops": ["innerq_fused", "bf16_pallas"], "inputs": ["rotating"],
  "points": [{}, {"window_programs": 3}, {"block_tokens": 64, "window_programs": 3}]}'
sweep _round22_8b4k 100 "$L4" '{"ops": ["innerq_fused", "bf16_pallas"], "inputs": ["rotating"],
  "points": [{}, {"window_programs": 2}, {"window_programs": 3}]}'
triton_gpu_tests "$OUT/round22_triton_gpu_tests.txt" "fused_equals or merge_in_steps" 150 \
  tests/test_kernels.py
rm -rf "$OUT/traces" "$OUT"/kernels_trace_round22_*.png
ls "$OUT" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

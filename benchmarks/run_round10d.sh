#!/usr/bin/env bash
# Round 10, fourth H200 call: on caches that rotate no keys the fused Triton kernel now applies
# sigma and the softmax scale to q as it gathers it (no scratch rows, no barrier). Compiled
# GPU tests of the preparation (no rotation, and the dispatch's form), then the short-context
# points: the op on a prepared q', the dispatch, XLA around the kernel, jax's bf16 kernel.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round10d.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round10d_log.txt"
start_log "$LOG"
triton_gpu_tests "$OUT/round10d_triton_gpu_tests.txt" "sigma or outerq" "${TRITON_S:-80}"
V='["bf16_pallas", "innerq_fused", "cfg_fused", "cfg_xlaprep"]'
kernel_points _round10d "[[8, 4096, {}, $V], [1, 4096, {}, $V], [1, 32768, {}, $V]]" \
  "${BENCH_S:-150}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

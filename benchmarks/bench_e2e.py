"""End-to-end decode speed of the Flax Llama on each cache kind (GPU).

Models with RANDOM weights of real shapes (labelled so in every row): a
Llama-3-8B shape (32 layers, hidden 4096, 32/8 heads, D 128) and the SmolLM2-135M
shape. For each cache kind (bf16, int8, OuterQ 2-bit, InnerQ 2-bit) and each
(B, context) the cache is filled with random content at that length (the
decode cost does not depend on how the tokens got there) and the jitted,
donated decode step is timed pipelined: N steps dispatched back to back, one
sync, median of several repetitions. Also: cache bytes, device memory in use,
and the largest batch at 32k that fits beside the weights, computed from the
measured per-sequence cache bytes.

    PYTHONPATH=$PWD python3 benchmarks/bench_e2e.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from innerq_jax import CacheConfig, KVCache
from models.llama import Llama, ModelConfig, jit_decode_step

SHAPES = {
    "llama3-8b-shape(random)": ModelConfig(vocab_size=128256, hidden_size=4096,
                                           intermediate_size=14336, num_layers=32, num_heads=32,
                                           num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                           tie_embeddings=False, max_positions=131072),
    "smollm2-135m-shape(random)": ModelConfig(vocab_size=49152, hidden_size=576,
                                              intermediate_size=1536, num_layers=30,
                                              num_heads=9, num_kv_heads=3, head_dim=64,
                                              rope_theta=100000.0, max_positions=131072),
}


def cache_configs(capacity):
    return {
        "bf16": CacheConfig.bf16(capacity=capacity),
        "int8": CacheConfig.int8(capacity=capacity),
        "outerq2": CacheConfig.outerq(capacity=capacity),
        "innerq2": CacheConfig.innerq(capacity=capacity),
    }


def random_cache(cfg: CacheConfig, mc: ModelConfig, B: int, ctx: int, key) -> KVCache:
    shape = jax.eval_shape(lambda: KVCache.create(cfg, mc.num_layers, B, mc.num_kv_heads,
                                                  mc.head_dim))
    leaves, treedef = jax.tree.flatten(shape.layers)
    keys = jax.random.split(key, len(leaves))

    def fill(s, k):
        if s.dtype == jnp.uint32:
            return jax.random.bits(k, s.shape, jnp.uint32)
        if s.dtype == jnp.int8:
            return jax.random.randint(k, s.shape, -127, 128, jnp.int32).astype(jnp.int8)
        x = jax.random.normal(k, s.shape, jnp.float32)
        # f32 leaves are the key normalization (sigma near 1); the rest bf16 data
        return (0.1 * x).astype(s.dtype) if s.dtype != jnp.float32 else 1.0 + 0.1 * x

    layers = jax.tree.unflatten(treedef, [jax.jit(fill, static_argnums=0)(s, k)
                                          for s, k in zip(leaves, keys)])
    lengths = jnp.full((B,), ctx - 1, jnp.int32)  # the timed steps stay inside capacity
    return KVCache(layers, lengths, jnp.zeros((B,), bool), cfg, mc.num_kv_heads, mc.head_dim)


def time_decode(model, cache, B, steps, reps):
    tok = jnp.ones((B,), jnp.int32)
    logits, cache = jit_decode_step(model, cache, tok)  # compile + warm-up
    logits.block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = jit_decode_step(model, cache, tok)
        logits.block_until_ready()
        times.append((time.perf_counter() - t0) / steps)
        # keep lengths constant so every repetition times the same context
        cache = jax.tree.map(lambda x: x, cache)
        cache = KVCache(cache.layers, cache.lengths - steps, cache.overflow, cache.config,
                        cache.num_kv_heads, cache.head_dim)
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = jax.devices()[0]
    limit = dev.memory_stats().get("bytes_limit", 0) if dev.memory_stats() else 0
    rows = []
    # (B, context) per model; kept small so one call fits the 10-minute device limit
    grids = {"llama3-8b-shape(random)": [(8, 32768), (1, 32768), (8, 4096), (32, 4096)],
             "smollm2-135m-shape(random)": [(8, 32768)]}
    shapes = SHAPES
    if args.quick:  # a CPU smoke run of the script itself
        shapes = {"tiny(random)": ModelConfig(vocab_size=256, hidden_size=64,
                                              intermediate_size=128, num_layers=2, num_heads=4,
                                              num_kv_heads=2, head_dim=64)}
        grids = {"tiny(random)": [(2, 512)]}
    for mname, mc in shapes.items():
        grid = grids[mname]
        model = Llama(mc, nnx.Rngs(0), dtype=jnp.bfloat16)
        wbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        for B, ctx in grid:
            for cname, cfg in cache_configs(ctx).items():
                per_seq = KVCache.create(cfg, mc.num_layers, 1, mc.num_kv_heads, mc.head_dim)
                seq_bytes = per_seq.total_nbytes()
                del per_seq
                row = dict(model=mname, cache=cname, B=B, context=ctx, weight_bytes=wbytes,
                           cache_bytes=seq_bytes * B, cache_bytes_per_seq=seq_bytes)
                if limit and wbytes + 1.15 * seq_bytes * B > limit:
                    row["skipped"] = "does not fit"
                    rows.append(row)
                    continue
                try:
                    cache = random_cache(cfg, mc, B, ctx, jax.random.PRNGKey(B + ctx))
                    med, lo, hi = time_decode(model, cache, B, args.steps, args.reps)
                    row.update(step_ms=med * 1e3, min_ms=lo * 1e3, max_ms=hi * 1e3,
                               tokens_per_s=B / med,
                               bytes_in_use=(dev.memory_stats() or {}).get("bytes_in_use"))
                    del cache
                except Exception as err:  # recorded, never hidden
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        if limit and not args.quick:
            for cname, cfg in cache_configs(32768).items():
                per_seq = KVCache.create(cfg, mc.num_layers, 1, mc.num_kv_heads, mc.head_dim)
                rows.append(dict(model=mname, cache=cname, context=32768,
                                 max_batch_at_32k=int((0.95 * limit - wbytes)
                                                      // per_seq.total_nbytes())))
        del model
    meta = dict(device=dev.device_kind, jax=jax.__version__, weights="random (real shapes)",
                steps=args.steps, reps=args.reps, memory_limit=limit)
    import os

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_decode.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(os.path.join(args.out, "e2e_decode.json"), os.path.join(args.out, "e2e_decode.png"))
    print(f"\n{meta}")
    print(f"{'model':28s} {'cache':8s} {'B':>3s} {'ctx':>6s} {'ms/step':>9s} {'tok/s':>9s} "
          f"{'vs bf16':>8s}")
    base = {(r["model"], r["B"], r["context"]): r.get("step_ms") for r in rows
            if r.get("cache") == "bf16" and "B" in r}
    for r in rows:
        if "B" not in r:
            continue
        b = base.get((r["model"], r["B"], r["context"]))
        ms = r.get("step_ms")
        sp = f"{b / ms:.2f}x" if (b and ms) else "-"
        print(f"{r['model']:28s} {r['cache']:8s} {r['B']:3d} {r['context']:6d} "
              f"{(f'{ms:.3f}' if ms else r.get('skipped') or 'ERR'):>9s} "
              f"{(f'{r['tokens_per_s']:.0f}' if ms else '-'):>9s} {sp:>8s}")
    for r in rows:
        if "max_batch_at_32k" in r:
            print(f"max batch @32k  {r['model']:28s} {r['cache']:8s} {r['max_batch_at_32k']}")



def plot(json_path: str, png_path: str) -> None:
    """Tokens/s per cache kind and shape, from a result JSON (run anywhere)."""
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")

    data = json.load(open(json_path))
    rows = [r for r in data["rows"] if r.get("step_ms")]
    groups = sorted({(r["model"], r["B"], r["context"]) for r in rows})
    kinds = ["bf16", "int8", "outerq2", "innerq2"]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.2
    for i, kind in enumerate(kinds):
        ys = [next((r["tokens_per_s"] for r in rows if (r["model"], r["B"], r["context"]) == g
                    and r["cache"] == kind), 0) for g in groups]
        ax.bar(np.arange(len(groups)) + (i - 1.5) * w, ys, w, label=kind)
    ax.set_xticks(np.arange(len(groups)),
                  [f"{m.split('(')[0]}\nB={b} ctx={c // 1024}k" for m, b, c in groups], fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput, {data['meta']['device']}, jax {data['meta']['jax']} "
                 "(random weights, real shapes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main()

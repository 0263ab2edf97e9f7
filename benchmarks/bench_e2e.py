"""End-to-end decode speed of the Flax Llama on each cache kind, beside its roofline.

The model has RANDOM weights of real shapes (labelled so in every row): the
Llama-3-8B shape (32 layers, hidden 4096, 32/8 heads, D 128). Each cache is
filled with random content at the row's context (the decode cost does not
depend on how the tokens got there); the jitted, donated decode step
(:class:`models.llama.DecodeStep`, or with ``--call module`` the NNX module passed to
``jit_decode_step`` on every call) is timed pipelined: ``--steps`` steps dispatched
back to back, one sync, median of ``--reps`` repetitions. Every row records:

* ms/step, tokens/s, the compile time of the step, the step's device footprint
  from XLA's memory analysis and the device's peak memory so far;
* the roofline: (weight bytes + cache bytes) per device over the copy
  bandwidth measured at the start of the same run, and the step's ratio to it;
* the standalone decode-attention time of one layer (same cache, same
  backend) times the layer count, and the weights at the copy bandwidth plus
  that: what the step would take if nothing but weights and attention cost.

Suites: ``decode`` (every cache kind at B 8 / 32k), ``grid`` (B in {1, 8, 32}
at 4k and 32k for the bf16 and InnerQ caches), ``max`` (each cache kind at the
largest batch that fits at 32k, actually run), ``mesh`` (B 8 / 32k and the
largest batch for bf16 and InnerQ on the mesh given by ``--mesh``), ``long`` (one
sequence at a 128k context, where the bf16 cache is as large as the 8B weights: bf16,
InnerQ, the recommended cache and OuterQ), and ``quick`` (a tiny model, any backend, for a
CPU smoke run). Results go to
``OUT/e2e_<tag>.json`` with a plot beside it.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=$PWD \
        python3 benchmarks/bench_e2e.py --suite decode,max,grid --out $OUT
    ... --suite mesh --mesh data=1,model=2 --tag tp2
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from innerq_jax import CacheConfig, KVCache
from innerq_jax.attention import decode_attention_layer, quantized_path
from innerq_jax.cache import WRITERS
from innerq_jax.sharding import cache_specs, on_mesh, parse_mesh
from models.llama import (DecodeStep, Llama, ModelConfig, fold_value_rotation, jit_decode_step,
                          shard_model)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_summary import host_summary, summarize  # noqa: E402

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        rope_theta=500000.0, tie_embeddings=False, max_positions=131072)
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                      max_positions=131072)
TINY = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=64, max_positions=8192)

# every row names its device, backend and jax version, as the kernel bench's rows do
ROW_SCHEMA = "innerq-jax/e2e-bench-row/1"
PROFILE_STEPS = 3  # steps traced per row with --profile (a trace grows ~10 MB per step)

KINDS = {
    "bf16": CacheConfig.bf16,
    "int8": CacheConfig.int8,
    "outerq2": CacheConfig.outerq,
    "innerq2": CacheConfig.innerq,
    # the project's recommended 2-bit cache: InnerQ-H, 36 sinks, 96 recent
    "recommended": CacheConfig.recommended,
}


def suite_rows(suite: str) -> list[tuple[str, int | str, int]]:
    """(cache kind, batch or 'max', context) rows of a suite, most important first."""
    if suite == "decode":
        return [("bf16", 8, 32768), ("innerq2", 8, 32768), ("outerq2", 8, 32768),
                ("int8", 8, 32768), ("recommended", 8, 32768)]
    if suite == "grid":
        rows = []
        for B, ctx in ((1, 32768), (32, 32768), (32, 4096), (8, 4096), (1, 4096)):
            rows += [(k, B, ctx) for k in ("bf16", "innerq2")]
        return rows
    if suite == "max":
        return [(k, "max", 32768) for k in ("bf16", "innerq2", "outerq2", "int8", "recommended")]
    if suite == "mesh":
        return [("bf16", 8, 32768), ("innerq2", 8, 32768), ("bf16", "max", 32768),
                ("innerq2", "max", 32768)]
    if suite == "long":  # one stream at a 128k context: the cache as large as the weights
        return [(k, 1, 131072) for k in ("bf16", "innerq2", "recommended", "outerq2")]
    if suite == "short":  # the default model's own regime: short contexts, few streams
        return [(k, B, ctx) for B, ctx in ((1, 1024), (1, 4096), (8, 8192))
                for k in ("bf16", "innerq2", "recommended")]
    if suite == "cli":  # what `innerq generate` runs: one stream, a 1024-token cache
        return [(k, 1, 1024) for k in ("bf16", "innerq2", "recommended")]
    if suite == "quick":
        return [(k, 2, 512) for k in KINDS]
    raise ValueError(f"unknown suite {suite!r}; choose decode, grid, max, mesh, long, short, "
                     "cli or quick")


# ------------------------------------------------------------------ measurement
def _pipelined(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device bytes/s (read + write) on device 0: the best of a few streaming
    kernels over ``nbytes`` (an elementwise op on 32-bit words, one on bf16)."""
    best = 0.0
    for dtype, op in ((jnp.uint32, lambda a: a ^ jnp.uint32(1)),
                      (jnp.bfloat16, lambda a: a + jnp.bfloat16(1))):
        x = jax.random.bits(jax.random.PRNGKey(0), (nbytes // 4,), jnp.uint32)
        x = x if dtype == jnp.uint32 else jax.lax.bitcast_convert_type(x, jnp.bfloat16).ravel()
        f = jax.jit(op)
        f(x).block_until_ready()
        n = 10
        t = min(_pipelined(lambda f=f, x=x: [f(x) for _ in range(n)][-1], 3)) / n
        best = max(best, 2 * nbytes / t)
        del x
    return best


def random_cache(cfg: CacheConfig, mc: ModelConfig, B: int, length: int, key, mesh) -> KVCache:
    """A cache whose every leaf holds random content; lengths = ``length``."""
    shape = jax.eval_shape(lambda: KVCache.create(cfg, mc.num_layers, B, mc.num_kv_heads,
                                                  mc.head_dim))
    leaves, treedef = jax.tree.flatten(shape.layers)
    specs = jax.tree.leaves(cache_specs(shape.layers))
    keys = jax.random.split(key, len(leaves))

    def fill(s, k):
        if s.dtype == jnp.uint32:
            return jax.random.bits(k, s.shape, jnp.uint32)
        if s.dtype == jnp.int8:
            return jax.random.randint(k, s.shape, -127, 128, jnp.int32).astype(jnp.int8)
        x = jax.random.normal(k, s.shape, jnp.float32)
        # f32 leaves are the key normalization (sigma near 1); the rest bf16 data
        return (0.1 * x).astype(s.dtype) if s.dtype != jnp.float32 else 1.0 + 0.1 * x

    out = []
    for s, k, spec in zip(leaves, keys, specs):
        sharding = NamedSharding(mesh, spec) if mesh is not None else None
        out.append(jax.jit(fill, static_argnums=0, out_shardings=sharding)(s, k))
    lengths = jnp.full((B,), length, jnp.int32)
    overflow = jnp.zeros((B,), bool)
    if mesh is not None:
        lengths = jax.device_put(lengths, NamedSharding(mesh, cache_specs(lengths)))
        overflow = jax.device_put(overflow, NamedSharding(mesh, cache_specs(overflow)))
    return KVCache(jax.tree.unflatten(treedef, out), lengths, overflow, cfg, mc.num_kv_heads,
                   mc.head_dim)


def time_step(model, cache, B, steps, reps, mesh, profile_dir=None, hlo_path=None,
              call="bound", fold_values=True):
    """(median, min, max) seconds per step, compile seconds, memory analysis, final cache,
    and with ``profile_dir`` the device-time summary of ``steps`` more steps traced there
    (:func:`benchmarks.trace_summary.summarize`). The profiler runs XLA op by op
    (no command buffers), so the traced span is longer than a timed step; busy and
    collective times are the ops' own. The host figures: the median time a call took
    to return in the timed loop, and the time to flatten its arguments alone. With
    ``hlo_path`` the compiled step's optimized HLO is written there (gzip text): where
    XLA copies a buffer, it says so.

    ``call="bound"`` steps through :class:`models.llama.DecodeStep` (the model's arrays
    as a flat list); ``"module"`` passes the NNX module to :func:`jit_decode_step` on
    every call, as a loop written against that function does (the host walks the module
    each step); ``"loop"`` runs the ``steps`` steps greedily in one device loop
    (:meth:`DecodeStep.greedy`, as ``generate`` does), one call per repetition. With
    ``fold_values`` a cache that rotates values is stepped with the rotation folded into
    the weights (:func:`models.llama.fold_value_rotation`, as ``generate`` does)."""
    tok = jnp.ones((B,), jnp.int32)
    t0 = time.perf_counter()
    if call not in ("bound", "module", "loop"):
        raise ValueError(f"call={call!r}; choose bound, module or loop")
    if call == "module":
        if fold_values and cache.config.rotate_values:
            model = fold_value_rotation(model, cache.config)
        compiled = jit_decode_step.lower(model, cache, tok, mesh=mesh).compile()
        args = (model,)
    else:  # loop: all the steps in one device loop, one call per repetition
        bound = DecodeStep(model, mesh=mesh, fold_values=fold_values)
        lowered = bound.lower(cache, tok) if call == "bound" else bound.lower_greedy(
            cache, tok, steps)
        compiled, args = lowered.compile(), (bound.params_for(cache.config),)
    per_call = steps if call == "loop" else 1
    compile_s = time.perf_counter() - t0
    if hlo_path is not None:
        os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
        with gzip.open(hlo_path, "wt") as f:
            f.write(compiled.as_text())
    ma = compiled.memory_analysis()
    # a copy: the cache's own lengths are donated by the first step
    start = jax.device_put(np.asarray(cache.lengths), cache.lengths.sharding)
    logits, cache = compiled(*args, cache, tok)  # warm-up
    logits.block_until_ready()
    times, calls = [], []
    for _ in range(reps):
        # every repetition times the same context
        cache = KVCache(cache.layers, jnp.copy(start), cache.overflow, cache.config,
                        cache.num_kv_heads, cache.head_dim)
        t = time.perf_counter()
        for _ in range(steps // per_call):
            c = time.perf_counter()
            logits, cache = compiled(*args, cache, tok)
            calls.append(time.perf_counter() - c)
        logits.block_until_ready()
        times.append((time.perf_counter() - t) / steps)
    flat = []
    for _ in range(20):  # the host's own share of a call: walking its arguments
        c = time.perf_counter()
        jax.tree.flatten((args, cache, tok))
        flat.append(time.perf_counter() - c)
    host = dict(call_ms=float(np.median(calls)) * 1e3, flatten_ms=float(np.median(flat)) * 1e3)
    if per_call == 1:  # (the loop returns its greedy tokens)
        assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    profile = None
    if profile_dir is not None:
        cache = KVCache(cache.layers, jnp.copy(start), cache.overflow, cache.config,
                        cache.num_kv_heads, cache.head_dim)
        traced = min(steps, PROFILE_STEPS) if per_call == 1 else steps
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(traced // per_call):
                logits, cache = compiled(*args, cache, tok)
            logits.block_until_ready()
        traces = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                                  recursive=True), key=os.path.getmtime)
        profile = summarize(traces[-1], traced) if traces else {"error": "no trace written"}
        if traces:  # the host's side of the same steps: where a call's launch time goes
            host["trace"] = host_summary(traces[-1], traced)
    footprint = None
    if ma is not None:
        footprint = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                        + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    return (float(np.median(times)), float(np.min(times)), float(np.max(times))), compile_s, \
        footprint, cache, profile, host


def time_attention(cache: KVCache, mc: ModelConfig, B: int, reps: int, mesh) -> float:
    """Seconds of one layer's decode attention on this cache (pipelined, median)."""
    q = jax.random.normal(jax.random.PRNGKey(3), (B, mc.num_heads, mc.head_dim), jnp.bfloat16)
    lay = cache.layers[0]
    f = jax.jit(lambda q, lay, n: on_mesh(
        lambda qq, ll, nn: decode_attention_layer(qq, ll, nn, cache.config), mesh, q, lay, n))
    f(q, lay, cache.lengths).block_until_ready()
    n = 20
    t = _pipelined(lambda: [f(q, lay, cache.lengths) for _ in range(n)][-1], reps)
    return float(np.median(t)) / n


def max_batch(limit: int, weight_bytes: int, per_seq: int, data: int, model: int) -> int:
    """Largest batch (a multiple of the data axis) whose cache fits beside the weights.

    Per device: weights / model (replicated over data) and the cache over data x model.
    """
    free = 0.97 * limit - weight_bytes / model - (2 << 30)  # 2 GiB: activations, logits
    return max(data, int(free * data * model // per_seq) // data * data)


def attention_kernel(cfg: CacheConfig, pairs: int, head_dim: int | None = None) -> str:
    """The decode-attention path the dispatch takes for this cache on this device with
    ``pairs`` (sequence, kv head) pairs per device of ``head_dim`` channels
    (``quantized_path``; "dense" for the bf16 cache, "int8" for the int8 one)."""
    if cfg.quantized:
        return quantized_path(cfg, pairs, head_dim=head_dim)
    return "dense" if cfg.kind == "bf16" else cfg.kind


# --------------------------------------------------------------------- running
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="decode,max,grid")
    ap.add_argument("--mesh", default=None, help="data=D,model=M (default: one device)")
    ap.add_argument("--model", choices=["llama3-8b", "smollm2"], default="llama3-8b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default=None, help="file name tag (default: the suite)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None,
                    help="keep only these rows of the suites: kind:B,... (B a number or max)")
    ap.add_argument("--profile", action="store_true",
                    help="trace --steps more steps of each row (jax.profiler, perfetto) under "
                         "OUT/traces and record device busy, collective and idle time per step")
    ap.add_argument("--hlo", action="store_true",
                    help="write each row's compiled step (optimized HLO, gzip text) under "
                         "OUT/hlo")
    ap.add_argument("--call", default="bound",
                    help="how the timed loop calls the step, comma-separated: bound "
                         "(models.llama.DecodeStep, the model's arrays as a flat list) or "
                         "module (jit_decode_step with the NNX module, walked on the host "
                         "every call) or loop (--steps greedy steps in one device loop, "
                         "DecodeStep.greedy); each row runs once per choice, labelled "
                         "kind@module / kind@loop")
    ap.add_argument("--writers", default="auto",
                    help="comma-separated cache writers for the quantized caches' appends "
                         f"({', '.join(WRITERS)}; see QuantLayer.append): each quantized row "
                         "runs once per writer, labelled kind/writer when not auto")
    ap.add_argument("--fold-values", default="on",
                    help="for caches that rotate values (recommended): on (the step's weights "
                         "carry the value rotation, models.llama.fold_value_rotation, as "
                         "generate and DecodeStep do), off, or on,off (each such row twice, "
                         "the unfolded one labelled kind~unfolded)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="stop starting new rows after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    suites = args.suite.split(",")
    quick = suites == ["quick"]
    mc = TINY if quick else {"llama3-8b": LLAMA3_8B, "smollm2": SMOLLM2}[args.model]
    mname = ("tiny" if quick else args.model) + "-shape(random weights)"
    mesh = parse_mesh(args.mesh) if args.mesh else None
    data = mesh.shape["data"] if mesh is not None else 1
    model_axis = mesh.shape["model"] if mesh is not None else 1
    ndev = data * model_axis
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = int(stats.get("bytes_limit", 0))
    bw = copy_bandwidth(256 << 20 if quick else 4 << 30)
    print(f"{dev.device_kind}: copy bandwidth {bw / 1e12:.2f} TB/s, memory limit "
          f"{limit / 2**30:.1f} GiB, mesh {args.mesh or 'none'}", flush=True)

    model = Llama(mc, nnx.Rngs(0), dtype=jnp.bfloat16)
    if mesh is not None:
        shard_model(model, mesh)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    rows = []
    writers = args.writers.split(",")
    bad = set(writers) - set(WRITERS)
    if bad:
        ap.error(f"--writers: unknown {sorted(bad)}; choose from {', '.join(WRITERS)}")
    calls = args.call.split(",")
    if set(calls) - {"bound", "module", "loop"}:
        ap.error(f"--call: choose from bound, module, loop (got {args.call!r})")
    folds = args.fold_values.split(",")
    if not folds or set(folds) - {"on", "off"}:
        ap.error(f"--fold-values: choose on, off or on,off (got {args.fold_values!r})")
    plan = []
    for suite in suites:
        for kind, B, ctx in suite_rows(suite):
            if args.only and f"{kind}:{B}" not in args.only.split(","):
                continue
            cfg = KINDS[kind](capacity=ctx)
            plan += [(suite, kind, cfg, B, ctx, w, c, f == "on")
                     for w in (writers if cfg.quantized else ["auto"]) for c in calls
                     for f in (folds if cfg.rotate_values else ["on"])]
    for suite, kind, cfg, B, ctx, writer, call, fold in plan:
        if writer != os.environ.get("INNERQ_CACHE_WRITER", "auto"):
            # read when the step is traced: trace again under the new writer
            if writer == "auto":
                os.environ.pop("INNERQ_CACHE_WRITER", None)
            else:
                os.environ["INNERQ_CACHE_WRITER"] = writer
            jax.clear_caches()
        per_seq = KVCache.create(cfg, mc.num_layers, 1, mc.num_kv_heads,
                                 mc.head_dim).total_nbytes()
        if B == "max":
            B = max_batch(limit, weight_bytes, per_seq, data, model_axis) if limit else 4
        label = (kind if writer == "auto" else f"{kind}/{writer}") + (
            "" if fold or not cfg.rotate_values else "~unfolded") + (
            "" if call == "bound" else f"@{call}")
        row = dict(schema=ROW_SCHEMA, device_kind=dev.device_kind, backend=dev.platform,
                   jax=jax.__version__, model=mname, cache=label, cache_writer=writer,
                   step_call=call, values_folded=bool(fold and cfg.rotate_values),
                   B=B, context=ctx, suite=suite,
                   mesh=args.mesh or "single", devices=ndev, weight_bytes=weight_bytes,
                   cache_bytes=per_seq * B, cache_bytes_per_seq=per_seq)
        # per device: weights split over model, cache over data x model
        dev_bytes = weight_bytes / model_axis + per_seq * B / ndev
        row["roofline_ms"] = dev_bytes / bw * 1e3
        if time.perf_counter() - t_start > args.budget_s:
            row["skipped"] = "time budget"
            rows.append(row)
            continue
        if limit and weight_bytes / model_axis + per_seq * B / ndev > 0.99 * limit:
            row["skipped"] = "does not fit"
            rows.append(row)
            continue
        for attempt in range(3):
            try:
                cache = random_cache(cfg, mc, B, ctx - args.steps - 2,
                                     jax.random.PRNGKey(B + ctx), mesh)
                pdir = None
                fname = re.sub(r"[^\w.-]", "_", label if "@" in label else f"{label}@{call}")
                fname = f"{fname}_B{B}"
                if args.profile:
                    pdir = os.path.join(args.out, "traces", f"{args.tag or 'e2e'}_{fname}")
                hlo = (os.path.join(args.out, "hlo", f"{args.tag or 'e2e'}_{fname}.hlo.gz")
                       if args.hlo else None)
                (med, lo, hi), comp, foot, cache, prof, host = time_step(
                    model, cache, B, args.steps, args.reps, mesh, profile_dir=pdir,
                    hlo_path=hlo, call=call, fold_values=fold)
                attn = time_attention(cache, mc, B, args.reps, mesh)
                pairs = (B // data) * max(1, mc.num_kv_heads // model_axis)  # per device
                row.update(attention_kernel=attention_kernel(cfg, pairs, mc.head_dim),
                           step_ms=med * 1e3, min_ms=lo * 1e3, max_ms=hi * 1e3,
                           tokens_per_s=B / med, compile_s=comp, step_footprint_bytes=foot,
                           host_call_ms=host["call_ms"], host_flatten_ms=host["flatten_ms"],
                           peak_bytes=(dev.memory_stats() or {}).get("peak_bytes_in_use"),
                           attention_ms_per_layer=attn * 1e3,
                           attention_ms_all_layers=attn * 1e3 * mc.num_layers,
                           weights_plus_attention_ms=(weight_bytes / model_axis / bw
                                                      + attn * mc.num_layers) * 1e3)
                if prof is not None:
                    row["profile"] = prof  # per device, per step (trace_summary.py)
                if host.get("trace"):
                    row["host_trace"] = host["trace"]  # host events per step, by name
                row["vs_roofline"] = row["step_ms"] / row["roofline_ms"]
                row["vs_weights_plus_attention"] = (row["step_ms"]
                                                    / row["weights_plus_attention_ms"])
                del cache
                break
            except Exception as err:  # recorded, never hidden
                msg = f"{type(err).__name__}: {str(err)[:300]}"
                cache = None  # noqa: F841 - frees a failed attempt's buffers before a retry
                if "RESOURCE_EXHAUSTED" in msg and row["B"] > data and attempt < 2:
                    B = max(data, int(B * 0.9) // data * data)  # largest batch: back off
                    row.update(B=B, cache_bytes=per_seq * B, oom_retry=msg[:120])
                    row["roofline_ms"] = (weight_bytes / model_axis + per_seq * B / ndev) \
                        / bw * 1e3
                    continue
                row["error"] = msg
                break
        rows.append(row)
        print(json.dumps(row), flush=True)

    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                devices=ndev, mesh=args.mesh or "single", weights="random (real shapes)",
                model=mname, steps=args.steps, reps=args.reps, memory_limit=limit,
                copy_bandwidth=bw, suites=suites)
    tag = args.tag or "_".join(suites)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e_{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(path, path[:-5] + ".png")
    print(f"\n{meta}")
    print(table(rows))
    prof = [r for r in rows if r.get("profile")]
    if prof:
        print("\nper device, per step: busy / collectives / span (ms), ops")
        for r in prof:
            for d, p in r["profile"].items():
                if "busy_ms" in p:
                    print(f"{r['cache']:8s} B{r['B']:<4} {d:14s} {p['busy_ms']:7.2f} "
                          f"{p['collective_ms']:7.2f} {p['span_ms']:7.2f} {p['ops']:6.0f}")


def table(rows) -> str:
    """The rows as text; call / flat: ms a step's call took to return on the host / to
    flatten its arguments."""
    head = (f"{'cache':8s} {'mesh':16s} {'B':>4s} {'ctx':>6s} {'ms/step':>8s} {'tok/s':>7s} "
            f"{'roofline':>8s} {'x roof':>6s} {'attn*L':>7s} {'x (W+A)':>7s} {'compile':>7s} "
            f"{'kernel':>8s} {'call':>6s} {'flat':>5s}")
    out = [head]
    for r in rows:
        if "step_ms" not in r:
            out.append(f"{r['cache']:8s} {r['mesh']:16s} {r['B']:>4} {r['context']:6d} "
                       f"{r.get('skipped') or r.get('error', '')[:60]}")
            continue
        out.append(f"{r['cache']:8s} {r['mesh']:16s} {r['B']:4d} {r['context']:6d} "
                   f"{r['step_ms']:8.2f} {r['tokens_per_s']:7.0f} {r['roofline_ms']:8.2f} "
                   f"{r['vs_roofline']:6.2f} {r['attention_ms_all_layers']:7.2f} "
                   f"{r['vs_weights_plus_attention']:7.2f} {r['compile_s']:6.1f}s "
                   f"{r.get('attention_kernel', ''):>8s} {r.get('host_call_ms', 0):6.2f} "
                   f"{r.get('host_flatten_ms', 0):5.2f}")
    return "\n".join(out)


def plot(json_path: str, png_path: str) -> None:
    """ms/step against the roofline per row, and tokens/s (run anywhere)."""
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")

    data = json.load(open(json_path))
    rows = [r for r in data["rows"] if r.get("step_ms")]
    if not rows:
        return
    labels = [f"{r['cache']}\nB{r['B']} {r['context'] // 1024}k" for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(rows)), 7), sharex=True)
    a1.bar(x - 0.2, [r["step_ms"] for r in rows], 0.4, label="measured step")
    a1.bar(x + 0.2, [r["roofline_ms"] for r in rows], 0.4, label="roofline (weights+cache)/bw")
    a1.set_ylabel("ms / step")
    a1.legend()
    m = data["meta"]
    a1.set_title(f"decode step, {m['model']}, {m['device']} x{m['devices']} ({m['mesh']}), "
                 f"jax {m['jax']}")
    a2.bar(x, [r["tokens_per_s"] for r in rows], 0.6, color="tab:green")
    a2.set_ylabel("tokens / s")
    a2.set_xticks(x, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main()

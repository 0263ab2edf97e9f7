"""Time per generated token of ``generate``'s loop (what ``innerq generate`` runs).

For each cache kind, on a model's shape with random weights: one prompt of ``--prompt``
random tokens, then runs of ``--new`` and of ``--short`` new tokens (no stop token; the
same cache capacity), each compiled once, then timed in ``--reps`` pairs (one run of each,
back to back, so a drift of the device's clocks between pairs cancels inside each pair).
The median over the pairs of

    ms per token = (run time (new) - run time (short)) / (new - short)

is the row's figure, the pairs' lowest and highest beside it (``ms_per_token_range``: the
method's spread on this machine, which a single pair does not show: on the H200 two sets
of single runs of the same program differed by ~0.1 ms per token, round 22). It cancels the
prefill and every other cost the two runs share; what they share is reported
as ``fixed_ms`` (run time (short) - (short - 1) x ms per token: the prefill inside the
program, the loop's start and the results' return), beside the same prefill timed in a
program of its own (``prefill_ms``; on the H200 the fixed cost was 2-4x it,
benchmarks/KERNEL_NOTES.md, round 21, which is why a run less that prefill does not time
the loop). Before anything is timed, the short run's tokens must be the long run's first
ones (greedy decoding: the same text, stopped earlier). Each row carries its HBM floor per
token, (weight bytes + the cache's bytes) / the measured copy rate.

    python benchmarks/bench_generate.py --model smollm2 --out DIR   # DIR/generate_<tag>.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import KINDS, LLAMA3_8B, SMOLLM2, TINY, copy_bandwidth  # noqa: E402
from innerq_jax import KVCache  # noqa: E402
from models.generate import generate  # noqa: E402
from models.llama import Llama, jit_prefill  # noqa: E402

MODELS = {"smollm2": SMOLLM2, "llama3-8b": LLAMA3_8B, "tiny": TINY}


def _prefill_s(model, ids, cfg, reps: int) -> float:
    tokens, lengths = jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32)
    jax.block_until_ready(jit_prefill(model, tokens, lengths, cfg))  # compile
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(jit_prefill(model, tokens, lengths, cfg))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _run_s(model, ids, cfg, new, sink, fold=True):
    """(run seconds, compile seconds, tokens [new]) of one generate call."""
    g = generate(model, [ids], cfg, max_new_tokens=new, stream=sink, fold_values=fold)
    return g.run_s, g.compile_s, g.tokens[0]


def _paired_runs(model, ids, cfg, new, short, sink, reps, fold=True):
    """(long-run seconds [reps], short-run seconds [reps], compile seconds of the long run,
    long tokens, short tokens): both programs compiled by a first run each, then ``reps``
    pairs of one long and one short run, back to back."""
    _, compile_s, toks = _run_s(model, ids, cfg, new, sink, fold)
    _, _, short_toks = _run_s(model, ids, cfg, short, sink, fold)
    pairs = [(_run_s(model, ids, cfg, new, sink, fold)[0],
              _run_s(model, ids, cfg, short, sink, fold)[0]) for _ in range(reps)]
    return [p[0] for p in pairs], [p[1] for p in pairs], compile_s, toks, short_toks


def _profile(model, ids, cfg, new, sink, fold, trace_dir) -> dict:
    """One more run of ``new`` tokens traced (jax.profiler) under ``trace_dir``: the device
    ops per generated token and the host's events (benchmarks/trace_summary.py). The run
    includes its prefill, so the figures are per token over the whole run."""
    import glob

    from trace_summary import host_summary, summarize

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        _run_s(model, ids, cfg, new, sink, fold)
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                              recursive=True), key=os.path.getmtime)
    if not traces:
        return {"error": "no trace written"}
    return dict(device=summarize(traces[-1], new), host=host_summary(traces[-1], new))


def run(model, mc, kinds, prompt: int, new: int, short: int, reps: int, stream: bool,
        bw: float, log=print, on_rows=None, profile_dir=None) -> list[dict]:
    """A row per cache kind (``error`` where it could not run); ``on_rows(rows)`` after each
    (the JSON written as rows finish, so a run cut short keeps the finished ones). With
    ``profile_dir`` each row also traces one long run there (``profile``: per token)."""
    rng = np.random.default_rng(0)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    ids = rng.integers(0, mc.vocab_size, size=prompt).tolist()
    sink = (lambda i, tok, done: None) if stream else None
    rows = []
    for kind in kinds:
        base, _, how = kind.partition("~")  # kind~unfolded: generate(fold_values=False)
        cfg = KINDS[base](capacity=-(-max(prompt + new, 256) // 128) * 128)  # G divides it
        cache_bytes = KVCache.create(cfg, mc.num_layers, 1, mc.num_kv_heads,
                                     mc.head_dim).total_nbytes()
        row = dict(cache=kind, prompt=prompt, new=new, short=short, stream=stream,
                   device_kind=jax.devices()[0].device_kind, weight_bytes=weight_bytes,
                   cache_bytes=cache_bytes, roofline_ms=(weight_bytes + cache_bytes) / bw * 1e3)
        try:
            pre = _prefill_s(model, ids, cfg, reps)
            longs, shorts, compile_s, toks, short_toks = _paired_runs(
                model, ids, cfg, new, short, sink, reps, fold=how != "unfolded")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            log(f"{kind:12s} {row['error']}")
            if on_rows:
                on_rows(rows)
            continue
        if profile_dir is not None:
            row["profile"] = _profile(model, ids, cfg, new, sink, how != "unfolded",
                                      os.path.join(profile_dir, kind.replace("~", "_")))
        if not np.array_equal(short_toks, toks[:short]):
            raise SystemExit(f"{kind}: the {short}-token run's tokens are not the {new}-token "
                             f"run's first ones: {short_toks.tolist()} vs {toks.tolist()}")
        pers = [(a - b) / (new - short) for a, b in zip(longs, shorts)]
        per, short_s = statistics.median(pers), statistics.median(shorts)
        row.update(ms_per_token=per * 1e3, tokens_per_s=1.0 / per if per > 0 else None,
                   ms_per_token_range=[min(pers) * 1e3, max(pers) * 1e3],
                   ms_per_token_pairs=[x * 1e3 for x in pers],
                   run_ms=statistics.median(longs) * 1e3, short_run_ms=short_s * 1e3,
                   fixed_ms=(short_s - (short - 1) * per) * 1e3, prefill_ms=pre * 1e3,
                   compile_s=compile_s)
        rows.append(row)
        if on_rows:
            on_rows(rows)
        lo, hi = row["ms_per_token_range"]
        log(f"{kind:12s} {row['ms_per_token']:7.3f} ms per token ({lo:.3f}-{hi:.3f} over "
            f"{reps} pairs; floor "
            f"{row['roofline_ms']:.3f}), fixed {row['fixed_ms']:.1f} ms per run (prefill alone "
            f"{row['prefill_ms']:.1f} ms)")
    return rows


def table(rows) -> str:
    out = [f"{'cache':12s} {'ms/token':>9s} {'range':>13s} {'floor':>6s} {'tok/s':>7s} "
           f"{'fixed ms':>9s} {'prefill':>8s} {'compile':>8s}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['cache']:12s} {r['error'][:60]}")
            continue
        lo, hi = r["ms_per_token_range"]
        out.append(f"{r['cache']:12s} {r['ms_per_token']:9.3f} {lo:6.3f}-{hi:6.3f} "
                   f"{r['roofline_ms']:6.3f} "
                   f"{r['tokens_per_s'] or 0:7.0f} {r['fixed_ms']:9.1f} {r['prefill_ms']:8.1f} "
                   f"{r['compile_s']:7.1f}s")
    return "\n".join(out)


def plot(rows, path: str) -> None:
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")
    rs = [r for r in rows if "ms_per_token" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rs))
    ax.bar(x - 0.2, [r["ms_per_token"] for r in rs], 0.4, label="ms per token")
    ax.bar(x + 0.2, [r["roofline_ms"] for r in rs], 0.4, label="HBM floor")
    ax.set_xticks(x, [r["cache"] for r in rs])
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"generate's loop ({rows[0]['device_kind'] if rows else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--caches", default="bf16,innerq2,recommended",
                    help="comma-separated cache kinds; KIND~unfolded runs generate with "
                         "fold_values=False (a cache that rotates values: the rotation in "
                         "each step instead of in the weights)")
    ap.add_argument("--prompt", type=int, default=928)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--short", type=int, default=None,
                    help="new tokens of the second run (default --new // 3; in [1, --new))")
    ap.add_argument("--reps", type=int, default=5, help="timed pairs (one run of each length)")
    ap.add_argument("--stream", action="store_true",
                    help="pass a no-op stream callback (the CLI streams by default)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one long run per cache under OUT/traces: device ops and "
                         "host events per generated token in the row's 'profile'")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    kinds = a.caches.split(",")
    bad = sorted({k for k in kinds if k.partition("~")[0] not in KINDS
                  or k.partition("~")[2] not in ("", "unfolded")})
    if bad:
        ap.error(f"--caches: unknown {bad}; choose from {', '.join(KINDS)}")
    if a.prompt < 1 or a.new < 2:
        ap.error("--prompt must be >= 1 and --new >= 2")
    short = max(1, a.new // 3) if a.short is None else a.short
    if not 1 <= short < a.new:
        ap.error(f"--short must lie in [1, --new) = [1, {a.new}), got {short}")
    if a.reps < 1:
        ap.error(f"--reps must be >= 1, got {a.reps}")
    mc = MODELS[a.model]
    model = Llama(mc, nnx.Rngs(0), dtype=jnp.bfloat16)
    dev = jax.devices()[0]
    print(f"{dev.device_kind}: {a.model} shape (random weights), prompt {a.prompt}, "
          f"{a.new} and {short} new tokens, stream {a.stream}", flush=True)
    bw = copy_bandwidth(256 << 20 if dev.platform == "cpu" else 4 << 30)
    print(f"copy rate {bw / 1e12:.2f} TB/s (the HBM floor's bandwidth)", flush=True)
    tag = a.tag or f"{a.model}{'_stream' if a.stream else ''}"
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"generate_{tag}.json")
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                model=f"{a.model}-shape(random weights)", prompt=a.prompt, new=a.new,
                short=short, reps=a.reps, stream=a.stream, copy_bytes_per_s=bw,
                caches=kinds)

    def write(rows):
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    rows = run(model, mc, kinds, a.prompt, a.new, short, a.reps, a.stream, bw,
               log=lambda s: print(s, flush=True), on_rows=write,
               profile_dir=os.path.join(a.out, "traces") if a.profile else None)
    write(rows)
    plot(rows, path[:-5] + ".png")
    print(table(rows))
    for r in rows:
        for dev, p in ((r.get("profile") or {}).get("device") or {}).items():
            if "busy_ms" in p:
                print(f"== {r['cache']} {dev}: busy {p['busy_ms']:.3f} ms, {p['ops']:.0f} "
                      f"kernels, span {p['span_ms']:.3f} ms per token")
                for name, (k, ms) in list(p.get("by_op", {}).items())[:14]:
                    print(f"   {ms:8.4f} ms  x{k:7.2f}  {name}")
        host = (r.get("profile") or {}).get("host") or {}
        for name, (k, ms) in list(host.items())[:12]:
            print(f"   host {ms:8.4f} ms  x{k:7.2f}  {name}")


if __name__ == "__main__":
    main()

"""Time per generated token of ``generate``'s loop (what ``innerq generate`` runs), by chunk.

``generate`` tests its stop condition (every sequence done, or the budget spent) in a
``while_loop``; on a GPU the host reads that condition after every iteration, so with
``chunk=1`` the host waits on every step before it launches the next. ``chunk=K`` runs
K steps per test. This times the loop for each cache kind and chunk size on a model's
shape with random weights: one prompt of ``--prompt`` random tokens, ``--new`` tokens
generated without a stop token, the prefill timed apart and taken off, so

    ms per token = (run time - prefill time) / (new - 1)

(the last token is sampled but never decoded). That takes off a prefill timed in a program
of its own, which need not cost what the prefill inside ``generate``'s program does (on the
H200 a run's fixed cost was 2-4x the standalone prefill, benchmarks/KERNEL_NOTES.md, round
21). So by default each point also runs with ``--short`` N new tokens (the same cache
capacity; default a third of ``--new``) and

    ms per token = (run time (new) - run time (N)) / (new - N)

cancels the prefill and every other cost the two runs share (``ms_per_token`` is that
figure, ``ms_per_token_less_prefill`` the first; ``--short 0`` times the first alone). Before anything is timed, every chunk
size's tokens are checked against ``chunk=1``'s (they must be equal).

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


def _run_s(model, ids, cfg, new, sink, chunk, reps):
    """(median run seconds over ``reps`` runs after a compiling one, compile seconds, the
    first run's tokens)."""
    gens = [generate(model, [ids], cfg, max_new_tokens=new, stream=sink, chunk=chunk)
            for _ in range(reps + 1)]  # the first compiles
    return statistics.median(g.run_s for g in gens[1:]), gens[0].compile_s, gens[0].tokens


def run(model, mc, kinds, chunks, prompt: int, new: int, reps: int, stream: bool,
        log=print, bw: float | None = None, short: int | None = None) -> list[dict]:
    """Rows per (cache, chunk); with ``bw`` (bytes/s) each row's HBM floor per token,
    ``roofline_ms`` = (weight bytes + the cache's bytes) / bw; with ``short`` the time per
    token from the difference of a run of ``new`` and one of ``short`` new tokens."""
    rng = np.random.default_rng(0)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    ids = rng.integers(0, mc.vocab_size, size=prompt).tolist()
    sink = (lambda i, tok, done: None) if stream else None
    rows = []
    for kind in kinds:
        cfg = KINDS[kind](capacity=-(-max(prompt + new, 256) // 128) * 128)  # G divides it
        pre = _prefill_s(model, ids, cfg, reps)
        cache_bytes = KVCache.create(cfg, mc.num_layers, 1, mc.num_kv_heads,
                                     mc.head_dim).total_nbytes()
        floor = None if bw is None else (weight_bytes + cache_bytes) / bw * 1e3
        want = None
        for chunk in chunks:
            row = dict(cache=kind, chunk=chunk, prompt=prompt, new=new, stream=stream,
                       prefill_ms=pre * 1e3, device_kind=jax.devices()[0].device_kind,
                       weight_bytes=weight_bytes, cache_bytes=cache_bytes, roofline_ms=floor)
            try:
                run_s, compile_s, toks = _run_s(model, ids, cfg, new, sink, chunk, reps)
                short_s = (None if short is None
                           else _run_s(model, ids, cfg, short, sink, chunk, reps)[0])
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                log(f"{kind:12s} chunk {chunk:3d}: {row['error']}")
                continue
            if want is None:
                want = toks
            row["tokens_match_chunk1"] = bool(np.array_equal(toks, want))
            less_prefill = (run_s - pre) / max(1, new - 1)
            per = less_prefill if short_s is None else (run_s - short_s) / (new - short)
            row.update(compile_s=compile_s, run_ms=run_s * 1e3, ms_per_token=per * 1e3,
                       ms_per_token_less_prefill=less_prefill * 1e3,
                       tokens_per_s=1.0 / per if per > 0 else None)
            if short_s is not None:
                row.update(short=short, short_run_ms=short_s * 1e3)
            rows.append(row)
            log(f"{kind:12s} chunk {chunk:3d}: {row['ms_per_token']:7.3f} ms per token "
                f"(run {row['run_ms']:.1f} ms, prefill {row['prefill_ms']:.1f} ms), tokens "
                f"{'equal' if row['tokens_match_chunk1'] else 'DIFFER'}")
    return rows


def table(rows) -> str:
    out = [f"{'cache':12s} {'chunk':>5s} {'ms/token':>9s} {'floor':>6s} {'tok/s':>7s} "
           f"{'run ms':>8s} {'prefill':>8s} {'compile':>8s} tokens"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['cache']:12s} {r['chunk']:5d} {r['error'][:60]}")
            continue
        floor = "" if r.get("roofline_ms") is None else f"{r['roofline_ms']:.3f}"
        out.append(f"{r['cache']:12s} {r['chunk']:5d} {r['ms_per_token']:9.3f} {floor:>6s} "
                   f"{r['tokens_per_s'] or 0:7.0f} {r['run_ms']:8.1f} {r['prefill_ms']:8.1f} "
                   f"{r['compile_s']:7.1f}s {'equal' if r['tokens_match_chunk1'] else 'DIFFER'}")
    return "\n".join(out)


def plot(rows, path: str) -> None:
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["cache"] for r in rows):
        rs = [r for r in rows if r["cache"] == kind and "ms_per_token" in r]
        ax.plot([r["chunk"] for r in rs], [r["ms_per_token"] for r in rs], "o-", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode steps per stop test (chunk)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"generate's loop ({rows[0]['device_kind'] if rows else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--caches", default="bf16,innerq2,recommended")
    ap.add_argument("--chunks", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=960)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--short", type=int, default=None,
                    help="also run each point with this many new tokens (< --new; default "
                         "--new // 3) and take the time per token from the difference; 0: "
                         "the run less a separately timed prefill instead")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stream", action="store_true",
                    help="pass a no-op stream callback (the CLI streams by default)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    kinds = a.caches.split(",")
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        ap.error(f"--caches: unknown {bad}; choose from {', '.join(KINDS)}")
    chunks = [int(c) for c in a.chunks.split(",")]
    if any(c < 1 for c in chunks) or chunks[0] != 1:
        ap.error("--chunks: integers >= 1, the first 1 (the reference every other is checked "
                 "against)")
    if a.prompt < 1 or a.new < 2:
        ap.error("--prompt must be >= 1 and --new >= 2")
    if a.short is None:
        a.short = max(1, a.new // 3)
    if not 0 <= a.short < a.new:
        ap.error(f"--short must lie in [0, --new) = [0, {a.new}), got {a.short}")
    short = a.short or None
    mc = MODELS[a.model]
    model = Llama(mc, nnx.Rngs(0), dtype=jnp.bfloat16)
    dev = jax.devices()[0]
    print(f"{dev.device_kind}: {a.model} shape (random weights), prompt {a.prompt}, "
          f"{a.new} new tokens, stream {a.stream}", flush=True)
    bw = copy_bandwidth(256 << 20 if dev.platform == "cpu" else 4 << 30)
    print(f"copy rate {bw / 1e12:.2f} TB/s (the HBM floor's bandwidth)", flush=True)
    rows = run(model, mc, kinds, chunks, a.prompt, a.new, a.reps, a.stream,
               log=lambda s: print(s, flush=True), bw=bw, short=short)
    tag = a.tag or f"{a.model}{'_stream' if a.stream else ''}"
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"generate_{tag}.json")
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                model=f"{a.model}-shape(random weights)", prompt=a.prompt, new=a.new,
                reps=a.reps, stream=a.stream, copy_bytes_per_s=bw, short=short)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, path[:-5] + ".png")
    print(table(rows))


if __name__ == "__main__":
    main()

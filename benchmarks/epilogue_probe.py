"""Device time of the Mosaic GPU op's epilogue (windows + merge, one Triton launch) per
variant, at the target shapes, from the jax profiler's trace of a timed program.

    PYTHONPATH=$PWD python3 benchmarks/epilogue_probe.py --out $OUT

The Mosaic kernel runs once per shape (its tuned defaults); its partials are then the
epilogue's input, copied so each of the program's calls reads its own. Every variant is
checked against the XLA merge (``combine_partials`` with the XLA window partial) before it
is traced. Variants: the default; the merge alone (no windows: what the windows cost);
more splits per merge step; other channel-block counts; other window steps; 8 warps.
Writes ``epilogue_probe<tag>.json`` and prints a table (us per call, device time).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import Shape, _prefill, _random_kv, _rel  # noqa: E402
from trace_summary import trace_runs  # noqa: E402

from innerq_jax.reference import prepare_query  # noqa: E402
from pallas_kernels import mgpu_decode as md  # noqa: E402
from pallas_kernels import mgpu_epilogue as me  # noqa: E402
from pallas_kernels import window_blocks as wb  # noqa: E402

CALLS = 16


@contextlib.contextmanager
def patched(merge_step=None, split_step=None, window_rows=None, num_warps=None):
    """The epilogue's trace-time constants set for one variant (its call cache cleared)."""
    saved = (me._MERGE_STEP, me._SPLIT_STEP, wb.window_part, me.plgpu)
    try:
        if merge_step:
            me._MERGE_STEP = merge_step
        if split_step:
            me._SPLIT_STEP = split_step
        if window_rows:
            wb.window_part = functools.partial(saved[2], chunk=window_rows)
        if num_warps:
            real = saved[3]
            shim = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real)
                                            if not n.startswith("__")})
            shim.CompilerParams = lambda **kw: real.CompilerParams(**{**kw,
                                                                      "num_warps": num_warps})
            me.plgpu = shim
        me._build_call.cache_clear()
        yield
    finally:
        me._MERGE_STEP, me._SPLIT_STEP, wb.window_part, me.plgpu = saved
        me._build_call.cache_clear()


def device_us(fn, arg_sets, names) -> dict:
    """us per call of the kernels whose names contain one of ``names`` (and all kernels),
    from a trace of CALLS calls in one jitted program."""
    prog = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(prog(arg_sets))
    s = next(iter(trace_runs(lambda: prog(arg_sets), 2, len(arg_sets)).values()))
    mine = sum(ms for op, (_, ms) in s["by_op"].items() if any(n in op for n in names))
    return dict(us=mine * 1e3, busy_us=s["busy_ms"] * 1e3, ops=s["ops"])


def run_shape(shape: Shape, log) -> list[dict]:
    B, T, H, r, D = shape.B, shape.T, shape.Hkv, shape.r, shape.D
    key = jax.random.PRNGKey(3)
    k, v = _random_kv(key, B, H, T, D)
    lengths = jnp.full((B,), T, jnp.int32)
    cfg = shape.cfg("innerq")
    layer = _prefill(k, v, lengths, cfg)
    del k, v
    q = jax.random.normal(jax.random.fold_in(key, 1), (B, H * r, D), jnp.float32)
    qp = prepare_query(q, layer, cfg, 1 / math.sqrt(D))
    call, operands, geo, windows, _, qp = md.prepare_call(qp, layer, lengths, cfg)
    o_part, ml_part = jax.block_until_ready(call(*operands))
    NS = o_part.shape[2]
    window = md.window_partial(qp, layer, lengths, cfg)
    ref_full = md.combine_partials(o_part, ml_part, window, geo)
    ref_merge = md.combine_partials(o_part, ml_part, None, geo)
    n_dc0 = me.channel_blocks(B, H, D, md.sm_count())
    log(f"{shape.label}: {NS} splits, windows={windows}, default channel blocks {n_dc0}")
    sets = [(o_part + 0.0, ml_part + 0.0) for _ in range(CALLS)]

    def epi(n_dc=None):
        return lambda o, ml: me.windows_and_merge(qp, layer, lengths, cfg, o, ml, geo,
                                                   n_channel_blocks=n_dc)

    variants = [("default", {}, epi(), ref_full),
                ("merge only (no windows)", {}, lambda o, ml: me.merge_partials(o, ml, geo, r),
                 ref_merge)]
    for step in (16, 32, 64):
        if step < NS * 2:
            variants.append((f"merge step {step}", dict(merge_step=step), epi(), ref_full))
    variants.append(("split step 64", dict(split_step=64), epi(), ref_full))
    for n_dc in (2, 4, 8):
        if n_dc != n_dc0 and D // n_dc >= 16:
            variants.append((f"channel blocks {n_dc}", {}, epi(n_dc), ref_full))
    for rows in (32, 128):
        variants.append((f"window rows {rows}", dict(window_rows=rows), epi(), ref_full))
    variants.append(("8 warps", dict(num_warps=8), epi(), ref_full))
    variants.append(("8 warps, merge step 32", dict(num_warps=8, merge_step=32), epi(), ref_full))
    rows_out = []
    for name, patch, fn, ref in variants:
        with patched(**patch):
            try:
                err = _rel(fn(o_part, ml_part), ref)
                assert err < 1e-4, f"rel err {err:.2e} against the XLA merge"
                t = device_us(fn, sets, ("epilogue", "merge"))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                log(f"  {name:28s} FAILED {type(e).__name__}: {str(e)[:200]}")
                rows_out.append(dict(shape=shape.label, variant=name, error=str(e)[:300]))
                continue
        log(f"  {name:28s} {t['us']:7.1f} us per call (busy {t['busy_us']:7.1f}), "
            f"rel err {err:.1e}")
        rows_out.append(dict(shape=shape.label, variant=name, splits=NS, rel_err=err, **t))
    return rows_out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="[[1, 131072], [8, 32768]]")
    args = ap.parse_args()
    t0 = time.time()

    def log(s):
        print(s, flush=True)

    log(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}")
    rows = []
    for B, T in json.loads(args.shapes):
        rows += run_shape(Shape(B, T), log)
        path = os.path.join(args.out, f"epilogue_probe{args.tag}.json")
        with open(path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           calls=CALLS, rows=rows), f, indent=1)
    log(f"{'shape':32s} {'variant':28s} {'us':>8s}")
    for r in rows:
        log(f"{r['shape']:32s} {r['variant']:28s} {r.get('us', float('nan')):8.1f}")
    log(f"total {time.time() - t0:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

"""What one jitted call costs the host per argument array (the decode step's launch bound).

A decode step called once per token from Python returns only after the host has handed
the runtime every argument and output buffer. The 2-bit cache of the 30-layer default
model is 422 arrays (14 per layer) against bf16's 62, so where the step is short the host,
not the device, sets its time. This measures that cost alone: a jitted function of N small
arrays that updates one row of each (the cache step's pattern), with and without donation,
and the same N rows held in one stacked array, for several N. Each layout's step is checked
on random arrays before it is timed.

    python benchmarks/host_overhead.py --out DIR     # DIR/host_overhead.{json,png}

Each point: the median time for the call to return on the host (``call_us``) and the time
per call of 50 calls issued back to back and then waited for (``per_call_us``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPE = (1, 3, 64, 64)  # one layer's window of the default model: [B, Hkv, rows, D]


def _time(fn, args, calls: int = 50, reps: int = 3):
    out = fn(*args)  # compile, and the first donation
    jax.block_until_ready(out)
    ret, per = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            c = time.perf_counter()
            out = fn(out, args[1])
            ret.append(time.perf_counter() - c)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t0) / calls)
    return float(np.median(ret)) * 1e6, float(np.min(per)) * 1e6


def _update(xs, t):
    return [jax.lax.dynamic_update_slice_in_dim(
        x, jax.lax.dynamic_slice_in_dim(x, t, 1, axis=2) + 1, t, axis=2) for x in xs]


def inputs(n: int, layout: str, key):
    """n random arrays of SHAPE, or (stacked) one array [n, *SHAPE] holding them."""
    if layout == "stacked":
        return jax.random.normal(key, (n, *SHAPE), jnp.float32).astype(jnp.bfloat16)
    return [jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)
            .astype(jnp.bfloat16) for i in range(n)]


def step(n: int, layout: str):
    """The jitted update of a layout: row t of every array plus one (donated: the inputs'
    buffers reused; copied: new outputs; stacked: the n arrays as one, donated)."""
    if layout == "stacked":
        return jax.jit(lambda x, t: _update([x.reshape(n * SHAPE[0], *SHAPE[1:])], t)[0]
                       .reshape(x.shape), donate_argnums=0)
    return jax.jit(_update, donate_argnums=0 if layout == "donated" else ())


def check(n: int, layout: str, t: int = 5) -> None:
    """The layout's step on random arrays adds one to row t of each and changes nothing else
    (run before a layout is timed)."""
    xs = inputs(n, layout, jax.random.PRNGKey(7))
    before = np.stack([np.asarray(x, np.float32) for x in xs])  # [n, *SHAPE] either way
    after = np.stack([np.asarray(y, np.float32) for y in step(n, layout)(xs, jnp.int32(t))])
    want = before.copy()
    want[:, :, :, t] = np.asarray(jnp.asarray(before[:, :, :, t] + 1, jnp.bfloat16), np.float32)
    if not np.array_equal(after, want):
        raise AssertionError(f"host_overhead: the {layout} step of {n} arrays is wrong")


def point(n: int, layout: str) -> dict:
    check(n, layout)
    xs = inputs(n, layout, jax.random.PRNGKey(n))
    call_us, per_call_us = _time(step(n, layout), (xs, jnp.int32(5)))
    return dict(arrays=1 if layout == "stacked" else n, rows=n, layout=layout,
                call_us=call_us, per_call_us=per_call_us,
                per_array_us=per_call_us / (1 if layout == "stacked" else n))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--sizes", default="16,64,256,640")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        for layout in ("donated", "copied", "stacked"):
            r = point(n, layout)
            rows.append(r)
            print(f"N {n:4d} {layout:8s} call {r['call_us']:8.1f} us  per call "
                  f"{r['per_call_us']:8.1f} us  ({r['per_array_us']:.2f} us per array)",
                  flush=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "host_overhead.json")
    with open(path, "w") as f:
        json.dump(dict(meta=dict(device=dev.device_kind, platform=dev.platform,
                                 jax=jax.__version__, shape=SHAPE), rows=rows), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for layout in ("donated", "copied", "stacked"):
            rs = [r for r in rows if r["layout"] == layout]
            ax.plot([r["rows"] for r in rs], [r["per_call_us"] for r in rs], "o-", label=layout)
        ax.set_xlabel("rows updated (one array each; stacked: one array)")
        ax.set_ylabel("us per call")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"host cost of a jitted call's arrays ({dev.device_kind})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path[:-5] + ".png", dpi=120)
    except ImportError:
        pass
    print(f"{'rows':>5s} {'layout':8s} {'call us':>8s} {'per call us':>11s} {'us/array':>8s}")
    for r in rows:
        print(f"{r['rows']:5d} {r['layout']:8s} {r['call_us']:8.1f} {r['per_call_us']:11.1f} "
              f"{r['per_array_us']:8.2f}")


if __name__ == "__main__":
    main()

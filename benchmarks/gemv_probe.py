"""A vector times a matrix at the default model's projection shapes: XLA's product against
the Pallas GEMV (``pallas_kernels/gemv.py``), checked, then timed.

For each shape (SmolLM2-135M at one sequence: qkv 576 x 960, o 576 x 576, gate / up
576 x 1536, down 1536 x 576) a chain of 30 products over 30 different weights, each fed
the tanh of the previous output (as a model's step feeds each projection an activation),
compiled once per variant and timed pipelined (the median over repetitions of the whole
chain, divided by 30). Each product's HBM floor is its weight's bytes over the measured copy
rate. Every variant's single product is first checked against a float64 reference.

    python benchmarks/gemv_probe.py --out DIR      # DIR/gemv_probe.{json,png}
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.gemv import gemv  # noqa: E402

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate/up": (576, 1536), "down": (1536, 576)}
LAYERS = 30
# (block_k, block_n, num_warps) of the Pallas variants
POINTS = [(64, 64, 4), (64, 32, 4), (128, 16, 4), (64, 16, 2), (128, 32, 4), (256, 16, 4)]


def _chain(product, K: int):
    def run(x, ws):
        for i in range(ws.shape[0]):
            y = product(x, ws[i])
            x = jnp.tanh(jnp.resize(y.astype(jnp.float32), (K,))).astype(x.dtype)
        return x
    return jax.jit(run)


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    n = (64 << 20) // 2
    src = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda v: v + 1)
    bw = 2 * src.nbytes / _time(copy, (src,), 10)
    rng = np.random.default_rng(0)
    rows = []
    for name, (K, N) in SHAPES.items():
        ws = jnp.asarray(rng.standard_normal((LAYERS, K, N)) / np.sqrt(K), jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal(K), jnp.bfloat16)
        want = np.asarray(x, np.float64) @ np.asarray(ws[0], np.float64)
        variants = {"xla": lambda v, w: v @ w}
        for bk, bn, nw in POINTS:
            if K % bk == 0 and N % bn == 0:
                variants[f"pallas k{bk} n{bn} w{nw}"] = (
                    lambda v, w, bk=bk, bn=bn, nw=nw: gemv(v, w, block_k=bk, block_n=bn,
                                                           num_warps=nw, interpret=a.interpret))
        floor = K * N * 2 / bw
        for label, product in variants.items():
            row = dict(shape=name, K=K, N=N, variant=label, device_kind=dev.device_kind,
                       jax=jax.__version__, floor_us=floor * 1e6)
            try:
                got = np.asarray(jax.jit(product)(x, ws[0]), np.float64)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                if err > 2.0 ** -7:
                    raise AssertionError(f"relative error {err:.3g} against float64")
                t = _time(_chain(product, K), (x, ws), a.reps) / LAYERS
                row.update(us_per_product=t * 1e6, rel_err=err, vs_floor=t / floor)
            except Exception as e:  # noqa: BLE001 - recorded, the probe goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gemv_probe.json")
    with open(path, "w") as f:
        json.dump(dict(meta=dict(device=dev.device_kind, jax=jax.__version__, layers=LAYERS,
                                 reps=a.reps, copy_bytes_per_s=bw), rows=rows), f, indent=1)
    _plot(rows, path[:-5] + ".png")
    print(f"{'shape':8s} {'variant':24s} {'us/product':>10s} {'floor us':>9s}")
    for r in rows:
        val = f"{r['us_per_product']:10.2f}" if "us_per_product" in r else r["error"][:40]
        print(f"{r['shape']:8s} {r['variant']:24s} {val} {r['floor_us']:9.2f}")


def _plot(rows, path: str) -> None:
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")
    ok = [r for r in rows if "us_per_product" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([f"{r['shape']} {r['variant']}" for r in ok], [r["us_per_product"] for r in ok])
    ax.set_xlabel("us per product (chain of 30, pipelined)")
    ax.set_title(f"x @ W at one sequence ({ok[0]['device_kind'] if ok else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

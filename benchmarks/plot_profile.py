"""A stacked bar per (mesh, cache) row of profiled bench_e2e runs: where a step goes.

Each bar splits the timed ms/step of device 0 into the attention kernel, the weight
products (XLA's GEMM fusions), collectives, the other ops, and idle time (step minus
busy), from the ``profile`` field that ``bench_e2e.py --profile`` writes.

    python benchmarks/plot_profile.py results/e2e_h200x2_profile_{single,tp2,dp2}.json \
        --out results/e2e_h200x2_profile_breakdown.png
"""

from __future__ import annotations

import argparse
import json
import re

ATTENTION = re.compile(r"decode_attention|mha_forward|attention", re.I)
GEMM = re.compile(r"gemm|dot|cublas|matmul", re.I)


def breakdown(row: dict) -> dict:
    """ms per step of device 0 by category (needs a profile with ``by_op``, else top)."""
    prof = next(iter(row["profile"].values()))
    ops = prof.get("by_op") or {n: [0, ms] for n, ms in prof["top"]}
    attn = sum(ms for n, (_, ms) in ops.items() if ATTENTION.search(n))
    gemm = sum(ms for n, (_, ms) in ops.items() if GEMM.search(n) and not ATTENTION.search(n))
    coll = prof["collective_ms"]
    other = max(0.0, prof["busy_ms"] - attn - gemm - coll)
    idle = max(0.0, row["step_ms"] - prof["busy_ms"])
    return dict(attention=attn, weights=gemm, collectives=coll, other=other, idle=idle)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")
    rows = []
    for f in a.files:
        data = json.load(open(f))
        rows += [r for r in data["rows"] if r.get("profile") and r.get("step_ms")]
    short = lambda m: m.replace("data=", "d").replace(",model=", " m")  # noqa: E731
    labels = [f"{r['cache']}\n{short(r['mesh'])}\nB{r['B']}" for r in rows]
    parts = [breakdown(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows)), 5))
    bottom = [0.0] * len(rows)
    for key in ("attention", "weights", "collectives", "other", "idle"):
        vals = [p[key] for p in parts]
        ax.bar(labels, vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(labels, [r["roofline_ms"] for r in rows], marker="_", s=900, c="k",
               label="HBM floor per device", zorder=3)
    ax.set_ylabel("ms per decode step (device 0)")
    m = rows[0]
    ax.set_title(f"decode step, {m['model']}, {m['device_kind']}, jax {m['jax']}, "
                 f"{m['context'] // 1024}k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    for r, p in zip(rows, parts):
        print(f"{r['cache']:8s} {r['mesh']:16s} B{r['B']:<4} step {r['step_ms']:6.2f}  "
              + "  ".join(f"{k} {v:5.2f}" for k, v in p.items()))


if __name__ == "__main__":
    main()

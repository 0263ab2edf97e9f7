"""Where a 2-bit cache loses accuracy: per-layer, per-head and per-channel error of the
stored keys and values against the exact ones, for the configurations of a fidelity set.

The real model prefills windows of a text into a bf16 cache; each layer's exact keys
(after RoPE, as a cache receives them) and values are then stored by every 2-bit
configuration of the set (``QuantLayer.prefill``, the cache's own code) and the quantized
region is decoded back to the model's space (normalization, rotation and signs undone).
Reported per configuration: the relative error ||k_hat - k|| / ||k|| and the same for v,
per layer (mean over heads and windows), the worst head, and the share of the key error
that falls on the 4 channels with the most of it (outlier channels dominate when that
share is high; a head has 64 channels, so an even spread gives 6%).

    PYTHONPATH=$PWD python benchmarks/error_breakdown.py --set finalists3 --windows 2 \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from innerq_jax import CacheConfig  # noqa: E402
from innerq_jax.cache import QuantLayer, hadamard  # noqa: E402
from innerq_jax.layout import dequantize_tensor, region_sizes  # noqa: E402
from models import evaluate as ev  # noqa: E402
from models.llama import prefill  # noqa: E402


def decoded(layer: QuantLayer, cfg: CacheConfig, n: int):
    """The first n quantized tokens of keys and values, back in the model's space."""
    kn = np.asarray(dequantize_tensor(layer.k), np.float64)[:, :, :n]
    vn = np.asarray(dequantize_tensor(layer.v), np.float64)[:, :, :n]
    mu = np.asarray(layer.k_centre, np.float64)[:, :, None, :]
    sigma = np.asarray(layer.k_scale, np.float64)[:, :, None, :]
    signs = (None if layer.rot_signs is None
             else np.asarray(layer.rot_signs, np.float64)[:, :, None, :])
    H = hadamard(kn.shape[-1]).astype(np.float64)
    k = kn * sigma
    if cfg.rotate_keys:  # stored ((k - mu) * s) @ H / sigma; H is its own inverse
        k = k @ H
        k = k * signs if signs is not None else k
    if cfg.rotate_values:
        vn = vn @ H
        vn = vn * signs if signs is not None else vn
    return k + mu, vn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="finalists3")
    ap.add_argument("--text", default=None, help="a text file (default: WikiText-2 test)")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args(argv)
    model, ckpt = ev._load_model(jnp.bfloat16, a.model)
    path = a.text or os.path.join(a.data_dir, ev.WIKITEXT)
    wins = ev.text_windows(ckpt.tokenizer, path, window=a.tokens, n=a.windows)
    B, T = wins.shape
    lengths = jnp.full((B,), T, jnp.int32)
    _, dense = prefill(model, jnp.asarray(wins), lengths, CacheConfig.bf16(capacity=T))
    rows = [(label, cfg.replace(capacity=T)) for label, cfg in ev.named_set(a.set)
            if cfg.quantized]
    out = {}
    for label, cfg in rows:
        n = int(np.asarray(region_sizes(lengths, cfg).quantized)[0])
        S = cfg.sink
        ek, ev_, worst, share = [], [], [], []
        for i, lay in enumerate(dense.layers):
            k, v = lay.k[:, :, :T], lay.v[:, :, :T]
            q = QuantLayer.prefill(k, v, lengths, cfg, layer=i)
            kh, vh = decoded(q, cfg, n)
            kx = np.asarray(k, np.float64)[:, :, S:S + n]
            vx = np.asarray(v, np.float64)[:, :, S:S + n]
            rk = np.linalg.norm(kh - kx, axis=(2, 3)) / np.linalg.norm(kx, axis=(2, 3))  # [B, H]
            rv = np.linalg.norm(vh - vx, axis=(2, 3)) / np.linalg.norm(vx, axis=(2, 3))
            ek.append(float(rk.mean()))
            ev_.append(float(rv.mean()))
            worst.append(int(rk.mean(0).argmax()))
            e_c = np.sum((kh - kx) ** 2, axis=2)  # [B, H, D] error energy per channel
            top = np.sort(e_c, axis=-1)[..., -4:].sum(-1) / e_c.sum(-1)
            share.append(float(top.mean()))
        out[label] = dict(config=cfg.short_name(), quantized_tokens=n, key_rel_err=ek,
                          value_rel_err=ev_, worst_key_head=worst, key_top4_channel_share=share)
        print(f"{label:28s} K {np.mean(ek):.3f} (layers {min(ek):.3f}-{max(ek):.3f})  "
              f"V {np.mean(ev_):.3f}  top-4 channels {100 * np.mean(share):.0f}% of K error",
              flush=True)
    meta = dict(set=a.set, text=os.path.basename(path), windows=B, tokens=T,
                model=str(ckpt.source))
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"fidelity_error_breakdown_{a.set}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, configs=out), f, indent=1)
    lines = [f"# Key and value error per layer, {a.set} ({meta['text']}, {B} windows of {T})",
             "", "Relative error ||x_hat - x|| / ||x|| over the quantized region, in the "
             "model's space; top-4: share of the key error on the 4 worst channels of a head.",
             "", "| configuration | K err (mean) | K err (worst layer) | V err (mean) | "
             "top-4 channels of K err |", "| --- | --- | --- | --- | --- |"]
    for label, r in out.items():
        ke = r["key_rel_err"]
        lines.append(f"| {label} | {np.mean(ke):.3f} | {max(ke):.3f} (layer {int(np.argmax(ke))}) "
                     f"| {np.mean(r['value_rel_err']):.3f} | "
                     f"{100 * np.mean(r['key_top4_channel_share']):.0f}% |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plt = ev.require_eval_extra("matplotlib.pyplot")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in out.items():
        a1.plot(r["key_rel_err"], label=label)
        a2.plot(r["value_rel_err"], label=label)
    a1.set_title("keys: relative error per layer")
    a2.set_title("values: relative error per layer")
    for ax in (a1, a2):
        ax.set_xlabel("layer")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

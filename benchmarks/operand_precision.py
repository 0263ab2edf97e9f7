"""The precision of 8-bit MMA operands for the fused InnerQ decode attention (CPU study).

benchmarks/KERNEL_NOTES.md ("What would close it", item 5) proposes e4m3 A operands for the
Mosaic kernel's two wgmma chains: the 2-bit codes unpacked four to a register as e4m3
``8 + code`` (or ``8 + 2 code``), which halves the chains' wgmmas and shortens the unpack. The
B operands (the query table Qexp and the probabilities Pexp) would then be e4m3 too, alone or
as a hi + lo pair (``x = e4m3(x) + e4m3(x - e4m3(x))``, twice the columns). Before any of
that is built this script measures what it would cost in accuracy, on the CPU:

* the unpack: the kernel's own (``pallas_kernels.mgpu_geometry.E4M3_PLAN``: shifts 0, 1, 4, 5,
  masks with the 0x50 exponent), checked against the words' codes in
  ``tests/test_mgpu_kernels.py``;
* the operands: the kernel's contract (``quantized_attention_core``'s math over the
  quantized region) in float64 as the reference, and the same math with q and the
  probabilities rounded as each operand format would store them. The codes, scales and zeros
  are exact in every variant (the kernel's integer-code product with each group's scale applied
  once); what differs is only what the MMAs' B operands hold. The e4m3 operands are scaled by
  a power of two first (q per head, the probabilities per 128-token block), so that their
  largest element sits at 2^8 and small ones stay out of e4m3's subnormals, as the kernel
  would do and undo in its f32 accumulators.

``--model-text PATH`` adds the real default model's activations (:func:`model_trials`).
Writes ``operand_precision.{json,png}`` and prints a table last (relative L2 error of the
attention output per variant and input regime, the median and worst of the trials, beside
the kernels' test tolerance, 1e-2).

    PYTHONPATH=$PWD python benchmarks/operand_precision.py --out benchmarks/results \
        --model-text ../shared/data/wikitext-2-raw/wiki.test.raw

What this study leaves out: the MMAs' own accumulation (here exact, in float64). Round 32
(KERNEL_NOTES.md) built both chains on e4m3 hi + lo operands: the keys matched this study on
the H200 (about half the bf16 keys' error at 32k and 128k), the values went over the
tolerance there (2.6e-2 at B 8 / 32k, 7.5e-2 at B 1 / 128k), most likely from the e4m3 MMAs'
accumulation under the codes' +8 offset, and were taken out.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
TOL = 1e-2  # the fused kernels' test tolerance (tests/test_mgpu_kernels.py)


# ------------------------------------------------------------------ operand formats
def _pow2_scale(x: np.ndarray, axis, top: float = 256.0) -> np.ndarray:
    """A power of two per slice along ``axis`` that puts the slice's largest magnitude in
    [top / 2, top) (1 where the slice is all zero)."""
    m = np.max(np.abs(x), axis=axis, keepdims=True)
    e = np.floor(np.log2(np.where(m > 0, m, 1.0)))
    return np.where(m > 0, 2.0 ** (np.log2(top) - 1 - e), 1.0)


def rounded(x: np.ndarray, fmt: str, axis) -> np.ndarray:
    """x as a B operand of format ``fmt`` would hold it, back in float64: "bf16", "e4m3" or
    "e4m3x2" (hi + lo); the e4m3 formats scaled by a power of two per slice along ``axis``
    first and unscaled after (exact)."""
    if fmt == "bf16":
        return x.astype(BF16).astype(np.float64)
    sc = _pow2_scale(x, axis)
    y = x * sc
    hi = y.astype(E4M3).astype(np.float64)
    if fmt == "e4m3":
        return hi / sc
    if fmt == "e4m3x2":
        lo = (y - hi).astype(E4M3).astype(np.float64)
        return (hi + lo) / sc
    raise ValueError(f"operand format {fmt!r}; choose bf16, e4m3 or e4m3x2")


# ------------------------------------------------------------------ the attention
def _quantize(x: np.ndarray, axis: int, G: int, bits: int = 2):
    """x quantized as the cache's own quantizer does (``innerq_jax.quant.quantize_groups``:
    hybrid asymmetric / symmetric groups, bf16 scales and zeros), grouped by G along
    ``axis``: (codes, scale, zero) as float64 [T, D], scale and zero broadcast back over each
    group."""
    from innerq_jax.quant import quantize_groups

    xg = np.moveaxis(x, axis, -1)  # [..., n]
    shape = xg.shape
    q = quantize_groups(xg.reshape(*shape[:-1], shape[-1] // G, G).astype(np.float32), bits)
    codes = np.asarray(q.codes, np.float64).reshape(shape)
    scale, zero = (np.repeat(np.asarray(a, np.float64), G, axis=-1).reshape(shape)
                   for a in (q.scale, q.zero))
    return tuple(np.moveaxis(a, -1, axis) for a in (codes, scale, zero))


def attention(q, kc, ks, kz, vc, vs, vz, G: int, q_fmt: str = "f64", p_fmt: str = "f64",
              block: int = 128):
    """Decode attention of q [r, D] over T quantized tokens (keys grouped along D, values
    along T: codes, scales, zeros [T, D]), in float64 but for the two B operands: q rounded
    as ``q_fmt`` (per query head) where it meets the key codes, the probabilities as
    ``p_fmt`` (per head and 128-token block) where they meet the value codes. Scales and zeros
    multiply once per group; the zero terms take the f32 query's group sums and the rounded
    probabilities' sums (what the kernel's accumulators see). Returns o [r, D]."""
    r, D = q.shape
    T = kc.shape[0]
    if D % G or T % G or T % block:
        raise ValueError(f"{T} tokens of {D} channels: the groups (G {G}) must divide both and "
                         f"the probability blocks ({block} tokens) the tokens")
    qr = q if q_fmt == "f64" else rounded(q, q_fmt, axis=1)
    # scores[t, h] = sum_g s[t, g] (codes . q_r)_g + z[t, g] * sum_g q
    code_dot = np.einsum("tgc,hgc->thg", kc.reshape(T, D // G, G), qr.reshape(r, D // G, G))
    qsum = q.reshape(r, D // G, G).sum(-1)
    s_g, z_g = ks[:, ::G], kz[:, ::G]
    scores = np.einsum("tg,thg->th", s_g, code_dot) + z_g @ qsum.T
    p = np.exp(scores - scores.max(0, keepdims=True))  # [T, r]
    if p_fmt != "f64":
        pb = p.reshape(T // block, block, r)
        p = rounded(pb, p_fmt, axis=1).reshape(T, r)
    # o[h, ch] = sum_tg s[tg, ch] (p . codes)_tg + z[tg, ch] * psum_tg
    pg = p.reshape(T // G, G, r)
    code_sum = np.einsum("ugh,ugc->uhc", pg, vc.reshape(T // G, G, D))
    vs_g, vz_g = vs[::G], vz[::G]  # [T/G, D]
    o = np.einsum("uc,uhc->hc", vs_g, code_sum) + np.einsum("uh,uc->hc", pg.sum(1), vz_g)
    return o / p.sum(0)[:, None]


VARIANTS = {  # name: (q operand, probability operand)
    "bf16 (today's kernels)": ("bf16", "bf16"),
    "e4m3": ("e4m3", "e4m3"),
    "e4m3 hi+lo": ("e4m3x2", "e4m3x2"),
    "e4m3 hi+lo keys, bf16 values": ("e4m3x2", "bf16"),
    "e4m3 keys, bf16 values": ("e4m3", "bf16"),
}
REGIMES = ("gaussian", "outlier key channels", "sharp softmax")


def trial(rng, regime: str, T: int, D: int, r: int, G: int):
    """One (sequence, kv head): random q, K, V of the regime, quantized to 2 bits."""
    q = rng.standard_normal((r, D)) / np.sqrt(D)
    k = rng.standard_normal((T, D))
    v = rng.standard_normal((T, D))
    if regime == "outlier key channels":  # a few channels 10x larger, as real keys have
        k[:, rng.choice(D, 4, replace=False)] *= 10.0
    elif regime == "sharp softmax":  # a peaked distribution: a few tokens hold the mass
        q *= 6.0
    kc, ks, kz = _quantize(k, axis=1, G=G)
    vc, vs, vz = _quantize(v, axis=0, G=G)
    return q, (kc, ks, kz, vc, vs, vz)


def model_trials(text_path: str, T: int = 1024, model_path=None, meta: dict | None = None):
    """(q, cache, G) per (layer, kv head) of the real default model (SmolLM2-135M-Instruct) on
    one window of ``text_path``: the last token's query heads (softmax scale in) over the
    window's keys and values after RoPE, as a decode step sees them. The keys are
    normalized with the paper's InnerQ cache's own statistics
    (``QuantLayer.key_statistics``: centre and absmax scale per channel past the sinks; the
    scale folded into q, and q . centre, one constant per query, left out of the softmax),
    then quantized like the synthetic regimes. ``meta``, if given, receives the shapes seen."""
    import jax.numpy as jnp

    from innerq_jax import CacheConfig
    from innerq_jax.cache import QuantLayer
    from models import evaluate as ev
    from models import llama

    model, ckpt = ev._load_model(jnp.bfloat16, model_path)
    tokens = ev.text_windows(ckpt.tokenizer, text_path, window=T, n=1)
    seen = []
    project = llama.Attention.project

    def recording(self, x, positions, inv_freq):
        out = project(self, x, positions, inv_freq)
        seen.append([np.asarray(t, np.float64) for t in out])
        return out

    llama.Attention.project = recording
    try:
        lengths = jnp.full((1,), T, jnp.int32)
        llama.prefill(model, jnp.asarray(tokens), lengths, CacheConfig.bf16(capacity=T))
    finally:
        llama.Attention.project = project
    cfg = CacheConfig.innerq(capacity=T)
    G = cfg.group_size
    _, _, Hq, D = seen[0][0].shape
    H = seen[0][1].shape[2]
    r = Hq // H
    if meta is not None:
        meta.update(text=os.path.basename(text_path), T=T, layers=len(seen), kv_heads=H,
                    n_rep=r, D=D, G=G, key_norm=f"{cfg.key_norm} ({cfg.key_scale})")
    for q, k, v in seen:  # [1, T, Hq, D], [1, T, Hkv, D] x 2
        mu, sigma = (np.asarray(a, np.float64)[0] for a in QuantLayer.key_statistics(
            jnp.swapaxes(jnp.asarray(k, jnp.float32), 1, 2), lengths, cfg))  # [H, D] each
        for h in range(H):
            qh = q[0, T - 1, h * r:(h + 1) * r] / np.sqrt(D) * sigma[h]
            kc, ks, kz = _quantize((k[0, :, h] - mu[h]) / sigma[h], axis=1, G=G)
            vc, vs, vz = _quantize(v[0, :, h], axis=0, G=G)
            yield qh, (kc, ks, kz, vc, vs, vz), G


def model_rows(text_path: str, T: int = 1024, log=print, meta: dict | None = None):
    """The study's rows for the real model's activations (:func:`model_trials`)."""
    return _regime_rows("SmolLM2 activations", model_trials(text_path, T, meta=meta), log)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _regime_rows(regime: str, trials, log):
    """One row per variant: the median and worst error over ``trials`` ((q, cache, G) each)
    of the variant's attention against the float64 one."""
    errs = {name: [] for name in VARIANTS}
    for q, cache, G in trials:
        ref = attention(q, *cache, G=G)
        for name, (qf, pf) in VARIANTS.items():
            errs[name].append(rel(attention(q, *cache, G=G, q_fmt=qf, p_fmt=pf), ref))
    rows = []
    for name, e in errs.items():
        rows.append({"regime": regime, "variant": name, "q_operand": VARIANTS[name][0],
                     "p_operand": VARIANTS[name][1], "median": float(np.median(e)),
                     "max": float(np.max(e)), "trials": len(e)})
        log(f"  {regime:22s} {name:30s} median {np.median(e):.2e}  max {np.max(e):.2e}")
    return rows


def run(trials: int, T: int, D: int, r: int, G: int, seed: int = 0, log=print):
    """The synthetic regimes' rows, ``trials`` random (sequence, kv head) caches each."""
    rng = np.random.default_rng(seed)
    rows = []
    for regime in REGIMES:
        cases = ((*trial(rng, regime, T, D, r, G), G) for _ in range(trials))
        rows += _regime_rows(regime, cases, log)
    return rows


def plot(rows, path) -> list[str]:
    """A bar per (regime, variant) of ``rows`` (median, worst as a tick) beside the tolerance,
    the regimes in the rows' order; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(VARIANTS)
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        med = [next(r["median"] for r in rows if r["regime"] == g and r["variant"] == name)
               for g in regimes]
        mx = [next(r["max"] for r in rows if r["regime"] == g and r["variant"] == name)
              for g in regimes]
        xs = np.arange(len(regimes)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, med, width, label=name)
        ax.scatter(xs, mx, marker="_", color="k", s=60, zorder=3)
    ax.axhline(TOL, color="r", ls="--", lw=1, label="kernel test tolerance")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(regimes)), regimes)
    ax.set_ylabel("rel. L2 error vs float64\n(bar: median, tick: worst)")
    ax.set_title("B operand formats of the InnerQ attention MMAs (2-bit, G 32)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return regimes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--model-text", default=None, metavar="PATH",
                    help="also the real default model's activations on a window of this text "
                         "(e.g. ../shared/data/wikitext-2-raw/wiki.test.raw)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    T, D, r, G = args.tokens, 128, 4, 32
    print(f"{args.trials} trials per regime: T {T}, D {D}, {r} query heads per kv head, G {G}, "
          "2 bits")
    rows = run(args.trials, T, D, r, G)
    shape = {"T": T, "D": D, "n_rep": r, "G": G, "bits": 2}
    if args.model_text:
        print("the real default model (SmolLM2-135M-Instruct) on a 1024-token window")
        shape["model"] = {}
        rows += model_rows(args.model_text, meta=shape["model"])
    os.makedirs(args.out, exist_ok=True)
    doc = {"shape": shape, "tolerance": TOL,
           "protocol": __doc__.split("\n\n")[2].strip(), "rows": rows}
    with open(os.path.join(args.out, "operand_precision.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(rows, os.path.join(args.out, "operand_precision.png"))
    print(f"\n{'regime':22s} {'variant':30s} {'median':>9s} {'worst':>9s}  (tolerance {TOL:g})")
    for row in rows:
        print(f"{row['regime']:22s} {row['variant']:30s} {row['median']:9.2e} {row['max']:9.2e}")


if __name__ == "__main__":
    main()

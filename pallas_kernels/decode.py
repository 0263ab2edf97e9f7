"""Fused decode attention over a quantized cache (flash-decoding), kernel (c).

``quantized_decode_attention(qp, layer, lengths, cfg)`` equals
``innerq_jax.attention.quantized_attention_core`` (the reference): softmax over
the bf16 sink window, the packed quantized region and the bf16 recent ring,
then the probability-weighted values.

One ``pallas_call`` with grid (splits + 1, Hkv, B):

* program (s < splits, h, b) walks the quantized tokens
  [s * chunk, min((s + 1) * chunk, Nq[b])) of sequence b, kv head h, in blocks
  of ``block_tokens``: key scores, an online softmax (running max and sum) and
  the probability-weighted values, K and V of a block in the same iteration;
* program (splits, h, b) covers the sink and recent windows (bf16, with a
  hi/lo bf16 split of q and p so they keep f32 accuracy);
* each program writes its unnormalised output, running max and sum; a small
  jnp combine (``_combine``) merges them.

Per-block math: :mod:`pallas_kernels.innerq_blocks` (InnerQ) and
:mod:`pallas_kernels.outerq_blocks` (OuterQ, same fused structure). The
quantized region's offsets come from :mod:`innerq_jax.layout`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from innerq_jax.attention import quantized_attention_core
from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import recent_slot_tokens, region_sizes
from pallas_kernels import innerq_blocks as ib
from pallas_kernels import outerq_blocks as ob
from pallas_kernels.innerq_blocks import LOG2E, NEG, Geometry, next_pow2
from pallas_kernels.triton_ext import call_quietly, dot_acc

NUM_SMS = 132  # H100 / H200 SXM; only used by the default split count
_WINDOW_HEADS = 16  # query rows of the window MMAs (>= 16)


def quantized_decode_attention_reference(qp, layer, lengths, cfg):
    """The contract: innerq_jax.attention.quantized_attention_core."""
    return quantized_attention_core(qp, layer, lengths, cfg)


# ------------------------------------------------------------------- windows
def _hi_lo(x):
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _window_part(q_ref, nh_q, k_refs, v_refs, valids, D):
    """Softmax pieces of dense bf16 windows: (o [NH, D], m [NH], l [NH]).

    k_refs / v_refs: window refs [n_i, D]; valids: per window a function
    rows -> bool [rows, 1] (rows = iota of the padded window).
    """
    NH = _WINDOW_HEADS
    dd = jax.lax.broadcasted_iota(jnp.int32, (D, NH), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (D, NH), 1)
    qt = plgpu.load(q_ref.at[jnp.minimum(hh, nh_q - 1), dd], mask=hh < nh_q, other=0.0)
    q_hi, q_lo = _hi_lo(qt)  # [D, NH]
    scores, vals, oks = [], [], []
    for k_ref, v_ref, valid in zip(k_refs, v_refs, valids):
        n = k_ref.shape[0]
        npad = max(16, next_pow2(n))
        rows = jax.lax.broadcasted_iota(jnp.int32, (npad, D), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (npad, D), 1)
        inb = rows < n
        rr = jnp.minimum(rows, n - 1)
        k = plgpu.load(k_ref.at[rr, cols], mask=inb, other=0)
        v = plgpu.load(v_ref.at[rr, cols], mask=inb, other=0)
        s = jnp.zeros((npad, NH), jnp.float32)
        s = dot_acc(dot_acc(s, k, q_hi), k, q_lo)
        ok = valid(jax.lax.broadcasted_iota(jnp.int32, (npad, 1), 0))
        scores.append(jnp.where(ok, s, NEG))
        vals.append(v)
        oks.append(ok)
    m = functools.reduce(jnp.maximum, [jnp.max(s, axis=0) for s in scores])
    o = jnp.zeros((NH, D), jnp.float32)
    l = jnp.zeros((NH,), jnp.float32)
    for s, v, ok in zip(scores, vals, oks):
        p = jnp.where(ok, jnp.exp2(s - m[None, :]), 0.0)
        l = l + jnp.sum(p, axis=0)
        p_hi, p_lo = _hi_lo(p.T)
        o = dot_acc(dot_acc(o, p_hi, v), p_lo, v)
    return o, m, l


# ------------------------------------------------------------------- kernels
def _fused_kernel(*refs, cfg: CacheConfig, geo, num_splits: int, chunk: int, has_sink: bool,
                  part):
    """Grid (num_splits + 1, H, B); ``part`` is the layout's quantized-region loop."""
    it = iter(refs)
    q_ref, nq_ref, sink_len_ref, live_ref = (next(it) for _ in range(4))
    quant_refs = [next(it) for _ in range(6)]
    sk_ref, sv_ref = (next(it), next(it)) if has_sink else (None, None)
    rk_ref, rv_ref = next(it), next(it)
    oq_ref, mq_ref, lq_ref, ow_ref, mw_ref, lw_ref = (next(it) for _ in range(6))
    s, b = pl.program_id(0), pl.program_id(2)

    @pl.when(s < num_splits)
    def _quantized():
        nq = nq_ref[b]
        o, m, l = part(q_ref, quant_refs, nq, s * chunk, chunk, geo)
        oq_ref[...] = o
        mq_ref[...] = m
        lq_ref[...] = l

    @pl.when(s == num_splits)
    def _windows():
        W = rk_ref.shape[0]
        bb = jnp.full((1, 1), b, jnp.int32)

        def live(rows):
            lv = plgpu.load(live_ref.at[bb + 0 * rows, jnp.minimum(rows, W - 1)],
                            mask=rows < W, other=0)
            return (rows < W) & (lv != 0)

        k_refs, v_refs, valids = [rk_ref], [rv_ref], [live]
        if has_sink:
            sink_len = sink_len_ref[b]
            k_refs.insert(0, sk_ref)
            v_refs.insert(0, sv_ref)
            valids.insert(0, lambda rows: rows < sink_len)
        o, m, l = _window_part(q_ref, q_ref.shape[0], k_refs, v_refs, valids, q_ref.shape[1])
        ow_ref[...] = o
        mw_ref[...] = m
        lw_ref[...] = l


def _innerq_part(q_ref, refs, nq, start, chunk, geo: Geometry):
    """Online softmax over the quantized tokens [start, min(start + chunk, nq))."""
    kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
    BT, NR, D = geo.BT, geo.NR, geo.D
    qexp, koff, qsum_cols = ib.expanded_query(q_ref, geo)
    n = jnp.clip(nq - start, 0, chunk)
    tok = jax.lax.broadcasted_iota(jnp.int32, (BT, 1), 0)

    def body(i, carry):
        m, lacc, o = carry
        base = start + i * BT
        kw, ks, kz = ib.load_key_block(kw_ref, ks_ref, kz_ref, base, nq, geo)
        s = ib.block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo)  # [BT, NR]
        s = jnp.where(base + tok < nq, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[None, :])
        lacc = alpha[None, :] * lacc + p
        pexp, psum, poff = ib.value_operands(p, geo)
        vwt, vst, vzt = ib.load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
        o = alpha[None, :] * o + ib.block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo)
        return m_new, lacc, o

    init = (jnp.full((NR,), NEG, jnp.float32), jnp.zeros((BT, NR), jnp.float32),
            jnp.zeros((D, NR), jnp.float32))
    m, lacc, o = jax.lax.fori_loop(0, pl.cdiv(n, BT), body, init)
    return o.T, m, jnp.sum(lacc, axis=0)


# ------------------------------------------------------------------- combine
def _combine(oq, mq, lq, ow, mw, lw, r):
    """Merges the split partials: o [B, H, r, D] f32 (rows of all-empty sequences are 0)."""
    NR = oq.shape[3]
    ow, mw, lw = ow[:, :, None, :NR], mw[:, :, None, :NR], lw[:, :, None, :NR]
    o = jnp.concatenate([oq, ow], axis=2)
    m = jnp.concatenate([mq, mw], axis=2)
    l = jnp.concatenate([lq, lw], axis=2)
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_max)
    l_tot = jnp.sum(w * l, axis=2)
    o_tot = jnp.sum(w[..., None] * o, axis=2)
    out = jnp.where(l_tot[..., None] > 0, o_tot / jnp.maximum(l_tot, 1e-30)[..., None], 0.0)
    return out[:, :, :r]


# ------------------------------------------------------------------- wrapper
@functools.lru_cache(maxsize=64)
def _build_call(cfg, geo, NS, chunk, shapes, num_warps, num_stages, interpret):
    """The pallas_call for one static configuration (cached so jit caches hit)."""
    B, H, NR, D = shapes[0][0]
    S = cfg.sink
    full = lambda shape: pl.BlockSpec(shape, lambda s, h, b: (0,) * len(shape))  # noqa: E731
    per_bh = lambda shape: pl.BlockSpec(  # noqa: E731
        (None, None) + shape[2:], lambda s, h, b: (b, h) + (0,) * (len(shape) - 2))
    in_specs = [per_bh(shapes[0][0])] + [full(sh) for sh, _ in shapes[1:4]]
    in_specs += [per_bh(sh) for sh, _ in shapes[4:]]
    last = lambda s: jnp.minimum(s, NS - 1)  # noqa: E731
    NH = _WINDOW_HEADS
    out_shape = [
        jax.ShapeDtypeStruct((B, H, NS, NR, D), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NS, NR), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NS, NR), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NH, D), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NH), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NH), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, NR, D), lambda s, h, b: (b, h, last(s), 0, 0)),
        pl.BlockSpec((None, None, None, NR), lambda s, h, b: (b, h, last(s), 0)),
        pl.BlockSpec((None, None, None, NR), lambda s, h, b: (b, h, last(s), 0)),
        pl.BlockSpec((None, None, NH, D), lambda s, h, b: (b, h, 0, 0)),
        pl.BlockSpec((None, None, NH), lambda s, h, b: (b, h, 0)),
        pl.BlockSpec((None, None, NH), lambda s, h, b: (b, h, 0)),
    ]
    kernel = functools.partial(
        _fused_kernel, cfg=cfg, geo=geo, num_splits=NS, chunk=chunk, has_sink=S > 0,
        part=_innerq_part if cfg.kind == "innerq" else ob.outerq_part,
    )
    return pl.pallas_call(
        kernel,
        grid=(NS + 1, H, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{cfg.kind}_decode_attention",
    )


def _default_splits(B, H, n_blocks):
    return int(max(1, min(n_blocks, round(4 * NUM_SMS / (B * H)))))


def quantized_decode_attention(
    qp: jax.Array,
    layer: QuantLayer,
    lengths: jax.Array,
    cfg: CacheConfig,
    *,
    interpret: bool = False,
    block_tokens: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Fused decode attention; returns f32 [B, Hkv, n_rep, D] = quantized_attention_core(...).

    qp [B, Hkv, n_rep, D] f32 (sigma, rotation and softmax scale folded in);
    lengths [B] int32. Tunables: ``block_tokens`` (tokens per loop iteration),
    ``num_splits`` (programs per sequence and head over the quantized region;
    default fills the GPU), ``num_warps``, ``num_stages`` (Triton).
    """
    if cfg.kind not in ("innerq", "outerq"):
        raise ValueError(f"quantized_decode_attention needs an innerq/outerq cache, got {cfg.kind!r}")
    B, H, r, D = qp.shape
    if layer.k_scale.shape != (B, H, D):
        raise ValueError(f"qp {qp.shape} does not match the cache (k_scale {layer.k_scale.shape})")
    G, bits, S, W, Tq = cfg.group_size, cfg.bits, cfg.sink, cfg.window, cfg.quant_capacity
    inner = cfg.kind == "innerq"
    mod = ib if inner else ob
    BT = block_tokens or mod.default_block_tokens(bits, G)
    geo = mod.Geometry(bits=bits, G=G, D=D, n_rep=r, BT=BT)
    geo.validate()
    NR = geo.NR
    n_blocks = max(1, -(-Tq // BT))
    NS = num_splits or _default_splits(B, H, n_blocks)
    chunk = -(-(-(-Tq // NS)) // BT) * BT
    NS = max(1, -(-Tq // chunk))

    lengths = jnp.asarray(lengths, jnp.int32)
    sizes = region_sizes(lengths, cfg)
    _, live = recent_slot_tokens(lengths, cfg)
    q2 = jnp.pad(qp.astype(jnp.float32) * LOG2E, ((0, 0), (0, 0), (0, NR - r), (0, 0)))
    quant = mod.kernel_operands(layer, geo)

    inputs = [q2, sizes.quantized, sizes.sink, live.astype(jnp.int32), *quant]
    if S:
        inputs += [layer.sink_k, layer.sink_v]
    inputs += [layer.recent_k, layer.recent_v]
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    call = _build_call(cfg, geo, NS, chunk, shapes, num_warps, num_stages, interpret)
    oq, mq, lq, ow, mw, lw = call_quietly(call, *inputs)
    return _combine(oq, mq, lq, ow, mw, lw, r)

"""The bf16 sink and recent windows of a quantized cache, in a Triton Pallas kernel.

Both the fused Triton kernel (its window program) and the Mosaic GPU op's
epilogue (:mod:`pallas_kernels.mgpu_epilogue`) attend over the windows with
this code: an online softmax over at most S + R + G bf16 rows per (sequence,
kv head), with q and p split into hi/lo bf16 pairs so the tensor-core dots keep
float32 accuracy. Which ring slots are live follows from the sequence's
length alone (:func:`innerq_jax.layout.slot_tokens`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from innerq_jax.config import CacheConfig
from innerq_jax.layout import RegionSizes, slot_tokens
from pallas_kernels import innerq_blocks as ib
from pallas_kernels.innerq_blocks import NEG, next_pow2
from pallas_kernels.triton_ext import dot_acc

WINDOW_HEADS = 16  # query rows of the window MMAs (>= 16)
# window rows per online-softmax step: 64 took the fused kernel at B 1 / 4k from 15.4 to
# 12.2 us per call on the H200 and costs nothing at long contexts (benchmarks/KERNEL_NOTES.md,
# "Round 7")
WINDOW_ROWS = 64


def hi_lo(x):
    """x (f32) as bf16 hi + lo, hi + lo = x to ~16 bits."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def cache_windows(sk_ref, sv_ref, rk_ref, rv_ref, sizes: RegionSizes, cfg: CacheConfig):
    """The windows of one (sequence, kv head) as :func:`window_part` takes them: the sink
    (if the cache has one: rows below the sink count) and the recent ring (live slots)."""
    W = rk_ref.shape[0]

    def live(rows):
        return (rows < W) & slot_tokens(sizes.rest, sizes.quantized, rows, W)[1]

    windows = [(rk_ref, rv_ref, live)]
    if cfg.sink:
        windows.insert(0, (sk_ref, sv_ref, lambda rows: rows < sizes.sink))
    return windows


def _joined(windows, which, vrows, cols):
    """The bf16 tile at rows ``vrows`` of the windows laid end to end (``which``: 0 keys, 1
    values); rows past every window read 0."""
    tile, off = None, 0
    for win in windows:
        n = win[0].shape[0]
        rows = vrows - off
        inside = (rows >= 0) & (rows < n)
        x = plgpu.load(win[which].at[jnp.clip(rows, 0, n - 1), cols], mask=inside, other=0)
        tile = x if tile is None else jnp.where(inside, x, tile)
        off += n
    return tile


def _joined_live(windows, vrows):
    """Which rows ``vrows`` [c, 1] of the windows laid end to end hold a live token."""
    ok, off = None, 0
    for k_ref, _, valid in windows:
        n = k_ref.shape[0]
        rows = vrows - off
        live = (rows >= 0) & (rows < n) & valid(jnp.clip(rows, 0, n - 1))
        ok = live if ok is None else ok | live
        off += n
    return ok


def window_part(q_ref, windows, D, chunk=WINDOW_ROWS, v_cols=None, v_order=None, part=None):
    """Online softmax over dense bf16 windows: (o [NH, DV], m [NH], l [NH]), scores in log2
    units (q times log2 e); rows past q_ref's heads (up to NH) hold finite filler.

    windows: (k_ref, v_ref, valid) per window; refs [n, D]; valid maps window row indices
    [rows, 1] to bool. The windows are read as one run of rows laid end to end (the sink's
    then the ring's), in steps of ``chunk`` rows so the tiles stay small. ``part`` (index,
    count): only the index-th of count equal runs of those rows (index may be a program
    id), so count programs share the windows; default all of them. ``v_cols`` (d0, DV):
    only value channels d0 .. d0 + DV of the output (the scores still use all D channels);
    default all D. ``v_order``: column i of the output holds channel ``v_order(d0 + i)``
    instead (a permutation of the block).
    """
    d0, DV = v_cols if v_cols is not None else (0, D)
    index, count = part if part is not None else (0, 1)
    NH = WINDOW_HEADS
    dd = jax.lax.broadcasted_iota(jnp.int32, (D, NH), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (D, NH), 1)
    qt = ib.load_q(q_ref, hh, dd)
    q_hi, q_lo = hi_lo(qt)  # [D, NH]
    m = jnp.full((NH,), NEG, jnp.float32)
    l = jnp.zeros((NH,), jnp.float32)
    o = jnp.zeros((NH, DV), jnp.float32)
    total = sum(w[0].shape[0] for w in windows)
    per = -(-total // count)  # rows per part
    c = min(chunk, max(16, next_pow2(per)))
    start = index * per

    def part_rows(c0, shape):  # this part's rows only (the next part's are the next program's)
        i = c0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        return jnp.where(i < per, start + i, total)

    for c0 in range(0, per, c):
        vrows = part_rows(c0, (c, D))
        cols = jax.lax.broadcasted_iota(jnp.int32, (c, D), 1)
        k = _joined(windows, 0, vrows, cols)
        ok = _joined_live(windows, part_rows(c0, (c, 1)))
        if DV == D and v_order is None:
            v = _joined(windows, 1, vrows, cols)
        else:
            vc = d0 + jax.lax.broadcasted_iota(jnp.int32, (c, DV), 1)
            v = _joined(windows, 1, part_rows(c0, (c, DV)), vc if v_order is None else v_order(vc))
        s = dot_acc(dot_acc(jnp.zeros((c, NH), jnp.float32), k, q_hi), k, q_lo)
        s = jnp.where(ok, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(ok, jnp.exp2(s - m_new[None, :]), 0.0)
        l = alpha * l + jnp.sum(p, axis=0)
        p_hi, p_lo = hi_lo(p.T)
        o = dot_acc(dot_acc(alpha[:, None] * o, p_hi, v), p_lo, v)
        m = m_new
    return o, m, l

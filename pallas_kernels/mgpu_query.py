"""The Mosaic GPU op's query operands in one Triton launch.

Before the Mosaic GPU kernel runs, each (sequence, kv head) needs the expanded
query ``Qexp`` (the B operand of the key MMAs: ``q * 2**-e_j`` at the column of
(token, head, channel group), rounded to bf16) and its column constants
``kconst`` (``koff`` = 128 x the sum of exactly those bf16 values, which cancels
the codes' +128 offset, and the per-group query sums).
:func:`pallas_kernels.mgpu_decode.query_operands` builds them in XLA, which
makes four small fusions of it: four launches per call, ~7 us of device time
and more of waiting at B 1 / 128k (benchmarks/KERNEL_NOTES.md, round 8). This
kernel does the same in one launch, one program per (kv head, sequence), from
the same gather tables (:attr:`Geometry.qexp_tables`, :attr:`Geometry.qsum_tables`):
``Qexp`` bit for bit, ``kconst`` up to the order of the float32 sums.

Through the dispatch it also prepares q' from the model's query heads
(:mod:`pallas_kernels.query_prep`: signs, rotation, sigma and softmax scale) and
writes it for the epilogue, and it writes each sequence's quantized-token count
(the kernel's loop bound): two more XLA launches per call folded into this one.
It runs in Pallas interpret mode on the CPU (tests/test_mgpu_kernels.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import region_sizes
from pallas_kernels import query_prep as qprep
from pallas_kernels.innerq_blocks import load_q, next_pow2
from pallas_kernels.mgpu_geometry import E4M3_OFFSET, Geometry, e4m3_head_scale
from pallas_kernels.query_prep import QueryPrep
from pallas_kernels.triton_ext import call_quietly


def _prologue(q_ref, len_ref, sig_ref, sg_ref, hm_ref, qp_ref, nq_ref, *, cfg: CacheConfig,
              prep: QueryPrep | None, signs: bool, interpret: bool):
    """What both query kernels do first: the sequence's quantized-token count (program h 0),
    q' stored for the gathers and the epilogue, then a barrier (the rows every thread stored,
    before any thread gathers them)."""
    h, b = pl.program_id(0), pl.program_id(1)

    @pl.when(h == 0)
    def _():
        nq_ref[b] = region_sizes(len_ref[b], cfg).quantized

    qprep.store_prepared(q_ref, sig_ref, sg_ref, hm_ref, qp_ref, prep=prep, cfg=cfg, signs=signs)
    if not interpret:
        plgpu.debug_barrier()


def _query_kernel(
    q_ref,  # [r, D]: this (sequence, kv head)'s queries (q' in f32, or the model's with prep)
    len_ref,  # [B] int32: tokens in each sequence
    sig_ref,  # [D] f32: sigma (read with prep)
    sg_ref,  # [D]: the layer's rotation signs (read with prep where the layer has them)
    hm_ref,  # [D, D] bf16: H * sqrt(D) (read with prep where the keys are rotated)
    head_ref,  # [S16, NKp] int32: Qexp's query head per entry (S16 = n_ksteps * 16)
    chan_ref,  # [S16, NKp] int32: its channel
    fac_ref,  # [S16, NKp] f32: its factor 2**-e_j (0: a structural zero)
    qh_ref,  # [NKp, G] int32: per key column, the head of its query sum
    qc_ref,  # [NKp, G] int32: the group's channels
    qok_ref,  # [NKp, G] int32: 1 where the column has a query sum
    qexp_ref,  # out [S16, NK] bf16: Qexp, steps stacked
    kconst_ref,  # out [2, NK] f32: koff, query sums
    qp_ref,  # out [r, D] f32: q' (the epilogue's query)
    nq_ref,  # out [B] int32: quantized tokens per sequence (the Mosaic kernel's loop bound)
    *, NK: int, cfg: CacheConfig, prep: QueryPrep | None, signs: bool, interpret: bool,
):
    _prologue(q_ref, len_ref, sig_ref, sg_ref, hm_ref, qp_ref, nq_ref, cfg=cfg, prep=prep,
              signs=signs, interpret=interpret)
    S16, NKp = head_ref.shape
    rows = jax.lax.broadcasted_iota(jnp.int32, (S16, NKp), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (S16, NKp), 1)
    # q * log2 e, then * 2**-e_j, rounded to bf16: the operations of query_operands in order
    qx = (load_q(qp_ref, head_ref[...], chan_ref[...]) * fac_ref[...]).astype(jnp.bfloat16)
    plgpu.store(qexp_ref.at[rows, cols], qx, mask=cols < NK)
    koff = 128.0 * jnp.sum(qx.astype(jnp.float32), axis=0)  # [NKp]
    qg = jnp.where(qok_ref[...] != 0, load_q(qp_ref, qh_ref[...], qc_ref[...]), 0.0)
    qsum = jnp.sum(qg, axis=1)  # [NKp]
    c1 = jax.lax.broadcasted_iota(jnp.int32, (NKp,), 0)
    plgpu.store(kconst_ref.at[0, c1], koff, mask=c1 < NK)
    plgpu.store(kconst_ref.at[1, c1], qsum, mask=c1 < NK)


def _query_kernel8(
    q_ref,  # [r, D]: as _query_kernel
    len_ref, sig_ref, sg_ref, hm_ref,  # as _query_kernel
    head_ref,  # [NKp, n8*32] int32: Qexp8's query head per entry (a row per key column)
    chan_ref,  # [NKp, n8*32] int32: its channel
    fac_ref,  # [NKp, n8*32] f32: its factor (E4M3_FAC; 0: a structural zero)
    colh_ref,  # [NKp, D] int32: each key column's query head (NR where it has none)
    qh_ref, qc_ref, qok_ref,  # [NKp, G] int32: as _query_kernel
    qexp_ref,  # out [2*n8, NK, 32] e4m3: tile 2s + half of step s (hi: half 0, lo: 1)
    kconst_ref,  # out [4, NK] f32: koff, scaled query sums, 1 / scale, 0
    qp_ref, nq_ref,  # out: as _query_kernel
    *, NK: int, cfg: CacheConfig, prep: QueryPrep | None, signs: bool, interpret: bool,
):
    """``key_format="e4m3x2"``: :func:`pallas_kernels.mgpu_decode.query_operands8` in one
    launch (the same values; koff and the sums up to the order of their float32 sums)."""
    _prologue(q_ref, len_ref, sig_ref, sg_ref, hm_ref, qp_ref, nq_ref, cfg=cfg, prep=prep,
              signs=signs, interpret=interpret)
    NKp, D = colh_ref.shape
    # one power of two per query head (each column takes its head's): the head's largest
    # |q * log2 e| into [TOP / 2, TOP)
    dcol = jax.lax.broadcasted_iota(jnp.int32, (NKp, D), 1)
    top = jnp.max(jnp.abs(load_q(qp_ref, colh_ref[...], dcol)), axis=1)  # [NKp]
    scale = e4m3_head_scale(top, jnp)
    c1 = jax.lax.broadcasted_iota(jnp.int32, (NKp,), 0)
    W = head_ref.shape[1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (NKp, W), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (NKp, W), 1)
    x = load_q(qp_ref, head_ref[...], chan_ref[...]) * fac_ref[...] * scale[:, None]
    hi = x.astype(jnp.float8_e4m3fn)
    lo = (x - hi.astype(jnp.float32)).astype(jnp.float8_e4m3fn)
    # rows past NK (the tile's padding) fall outside the column axis, masked off
    plgpu.store(qexp_ref.at[2 * (cols // 32), rows, cols % 32], hi, mask=rows < NK)
    plgpu.store(qexp_ref.at[2 * (cols // 32) + 1, rows, cols % 32], lo, mask=rows < NK)
    koff = E4M3_OFFSET * jnp.sum(hi.astype(jnp.float32) + lo.astype(jnp.float32), axis=1)
    qg = jnp.where(qok_ref[...] != 0, load_q(qp_ref, qh_ref[...], qc_ref[...]), 0.0)
    qsum = jnp.sum(qg, axis=1) * scale  # [NKp]
    plgpu.store(kconst_ref.at[0, c1], koff, mask=c1 < NK)
    plgpu.store(kconst_ref.at[1, c1], qsum, mask=c1 < NK)
    plgpu.store(kconst_ref.at[2, c1], 1.0 / scale, mask=c1 < NK)
    plgpu.store(kconst_ref.at[3, c1], jnp.zeros_like(scale), mask=c1 < NK)


@functools.lru_cache(maxsize=32)
def _tables8(geo: Geometry):
    """The e4m3 gather tables, a row per key column (padded to a power of two) and the
    column's steps and K positions along it; each column's head for its scale."""
    head, chan, fac = geo.qexp8_tables  # [n8, NK, 32]
    NK, NKp = geo.NK, next_pow2(geo.NK)
    flat = lambda x: np.pad(np.transpose(x, (1, 0, 2)).reshape(NK, -1), ((0, NKp - NK), (0, 0)))  # noqa: E731
    qh, qg, ok = geo.qsum_tables
    colh = np.where(ok, qh, geo.NR)
    colh = np.repeat(np.pad(colh, (0, NKp - NK), constant_values=geo.NR)[:, None], geo.D, 1)
    return (flat(head).astype(np.int32), flat(chan).astype(np.int32),
            flat(fac).astype(np.float32), colh.astype(np.int32))


@functools.lru_cache(maxsize=32)
def _tables(geo: Geometry):
    """The gather tables padded to power-of-two widths (Triton tiles), as numpy arrays."""
    head, chan, fac = geo.qexp_tables
    S16, NK = geo.n_ksteps * 16, geo.NK
    NKp = next_pow2(NK)
    pad = lambda x: np.pad(x.reshape(S16, NK), ((0, 0), (0, NKp - NK)))  # noqa: E731
    qh, qg, ok = geo.qsum_tables
    g = np.arange(geo.G)
    qcol = np.pad(qg, (0, NKp - NK))[:, None] * geo.G + g[None, :]
    return (pad(head).astype(np.int32), pad(chan).astype(np.int32), pad(fac).astype(np.float32),
            np.repeat(np.pad(qh, (0, NKp - NK))[:, None], geo.G, 1).astype(np.int32),
            qcol.astype(np.int32),
            np.repeat(np.pad(ok, (0, NKp - NK))[:, None], geo.G, 1).astype(np.int32))


def _kernel_tables(geo: Geometry):
    """The query kernel's gather tables in its argument order: the e4m3 Qexp's (with each
    column's head) or the bf16 one's, then the query sums'."""
    return (*_tables8(geo), *_tables(geo)[3:]) if geo.e4m3 else _tables(geo)


@functools.lru_cache(maxsize=32)
def _build_call(geo: Geometry, cfg: CacheConfig, shapes, prep: QueryPrep | None, signs: bool,
                interpret: bool):
    B, H = shapes[0][0][:2]
    S16, NK = geo.n_ksteps * 16, geo.NK
    tables = _kernel_tables(geo)
    kernel = _query_kernel8 if geo.e4m3 else _query_kernel
    qexp_shape, qexp_dtype = (((2 * geo.n_ksteps8, NK, 32), jnp.float8_e4m3fn) if geo.e4m3
                              else ((S16, NK), jnp.bfloat16))
    nkc = geo.kconst_rows
    full = lambda shape: pl.BlockSpec(shape, lambda h, b: (0,) * len(shape))  # noqa: E731
    per_bh = lambda shape: pl.BlockSpec((None, None) + shape, lambda h, b: (b, h) + (0,) * len(shape))  # noqa: E731
    kw = {}
    if not interpret:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=1)
    return pl.pallas_call(
        functools.partial(kernel, NK=NK, cfg=cfg, prep=prep, signs=signs,
                          interpret=interpret),
        grid=(H, B),
        in_specs=[per_bh((geo.n_rep, geo.D)), full((B,)), per_bh((geo.D,)), per_bh((geo.D,)),
                  full(shapes[4][0])] + [full(t.shape) for t in tables],
        out_specs=[per_bh(qexp_shape), per_bh((nkc, NK)), per_bh((geo.n_rep, geo.D)),
                   full((B,))],
        out_shape=[jax.ShapeDtypeStruct((B, H, *qexp_shape), qexp_dtype),
                   jax.ShapeDtypeStruct((B, H, nkc, NK), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, geo.n_rep, geo.D), jnp.float32),
                   jax.ShapeDtypeStruct((B,), jnp.int32)],
        interpret=interpret,
        name="innerq_mgpu_query",
        **kw,
    )


def query_operands_kernel(qp: jax.Array, geo: Geometry, layer: QuantLayer, lengths: jax.Array,
                          cfg: CacheConfig, *, prep: QueryPrep | None = None,
                          interpret: bool = False):
    """qp [B, H, r, D] -> (Qexp [B, H, n_ksteps, 16, NK] bf16, kconst [B, H, 2, NK] f32, q'
    [B, H, r, D] f32, quantized tokens per sequence [B] int32), in one launch: Qexp and
    kconst as :func:`pallas_kernels.mgpu_decode.query_operands` gives them from q'.

    qp is q' (f32) where ``prep`` is None, else the model's query heads, prepared here as
    :func:`pallas_kernels.query_prep.store_prepared` says.
    """
    B, H, r, D = qp.shape
    if (r, D) != (geo.n_rep, geo.D):
        raise ValueError(f"qp {qp.shape} does not match the geometry (n_rep={geo.n_rep}, "
                         f"D={geo.D})")
    if prep is not None:
        qprep.check_query(qp, layer)
    inputs = [qp.astype(jnp.float32) if prep is None else qp, jnp.asarray(lengths, jnp.int32),
              *qprep.side_operands(layer, cfg, prep)]
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    call = _build_call(geo, cfg, shapes, prep, layer.rot_signs is not None, interpret)
    tables = [jnp.asarray(t) for t in _kernel_tables(geo)]
    qexp, kconst, q_prepared, nq = call_quietly(call, *inputs, *tables, interpret=interpret)
    if geo.e4m3:
        return qexp.reshape(B, H, 2 * geo.n_ksteps8, geo.NK, 32), kconst, q_prepared, nq
    return qexp.reshape(B, H, geo.n_ksteps, 16, geo.NK), kconst, q_prepared, nq


__all__ = ["query_operands_kernel"]

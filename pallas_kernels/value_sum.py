"""Kernel (b): the probability-weighted sum over the InnerQ-packed values, alone.

    o[b, h, r, :] = sum_t p[b, h, r, t] * v_hat[b, h, t, :]   over t < n[b]

Grid (splits, Hkv, B); each program walks its token chunk in blocks and keeps
an f32 [D, n_rep] accumulator; the splits are summed in jnp. The math is
:func:`pallas_kernels.innerq_blocks.block_value_sum`: per-code partial
products p . c in one MMA chain per block, then each (group, channel) scale
once, and the zero-point times the per-group sum of p, computed once per block
and shared by every channel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from innerq_jax.layout import QuantizedTensor, dequantize_tensor
from pallas_kernels import innerq_blocks as ib
from pallas_kernels.triton_ext import call_quietly


def value_sum_reference(p: jax.Array, v: QuantizedTensor, n: jax.Array) -> jax.Array:
    """Plain jnp: p [B, H, r, Tq] times the dequantized values over t < n[b] -> [B, H, r, D]."""
    Tq = p.shape[-1]
    keep = (jnp.arange(Tq)[None, :] < n[:, None])[:, None, None, :]
    return jnp.einsum("bhrt,bhtd->bhrd", jnp.where(keep, p, 0.0), dequantize_tensor(v),
                      precision=jax.lax.Precision.HIGHEST)


def _kernel(n_ref, p_ref, vw_ref, vs_ref, vz_ref, o_ref, *, geo: ib.Geometry, chunk: int):
    split, b = pl.program_id(0), pl.program_id(2)
    nq = n_ref[b]
    start = split * chunk
    BT, NR, D = geo.BT, geo.NR, geo.D
    Tq = p_ref.shape[1]  # p rows past Tq are never read (mask below)
    tt = jax.lax.broadcasted_iota(jnp.int32, (BT, NR), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (BT, NR), 1)

    def body(i, o):
        base = start + i * BT
        tok = base + tt
        p = plgpu.load(p_ref.at[hh, jnp.minimum(tok, Tq - 1)], mask=tok < nq, other=0.0)
        pexp, psum, poff = ib.value_operands(p, geo)
        vwt, vst, vzt = ib.load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
        return o + ib.block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo)

    n = jnp.clip(nq - start, 0, chunk)
    o = jax.lax.fori_loop(0, pl.cdiv(n, BT), body, jnp.zeros((D, NR), jnp.float32))
    o_ref[...] = o.T


@functools.lru_cache(maxsize=32)
def _build(geo, NS, chunk, shapes, num_warps, num_stages, interpret):
    (B,), (_, H, NR, _) = shapes[0], shapes[1]
    per_bh = lambda shape: pl.BlockSpec(
        (None, None) + shape[2:], lambda s, h, b: (b, h) + (0,) * (len(shape) - 2))
    call = pl.pallas_call(
        functools.partial(_kernel, geo=geo, chunk=chunk),
        grid=(NS, H, B),
        in_specs=[pl.BlockSpec((B,), lambda s, h, b: (0,))] + [per_bh(sh) for sh in shapes[1:]],
        out_specs=pl.BlockSpec((None, None, None, NR, geo.D), lambda s, h, b: (b, h, s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, NS, NR, geo.D), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="innerq_value_sum",
    )
    return lambda *a: [call(*a)]


def quantized_value_sum(p: jax.Array, v: QuantizedTensor, n: jax.Array, *,
                        interpret: bool = False, block_tokens: int | None = None,
                        num_splits: int | None = None, num_warps: int = 4,
                        num_stages: int = 3) -> jax.Array:
    """InnerQ value sum [B, H, r, D] f32 (equals :func:`value_sum_reference`).

    p [B, H, r, Tq] f32 probabilities (any non-negative weights), n [B] tokens
    held in the quantized region (a multiple of G).
    """
    if v.grouping != "t":
        raise ValueError(f"kernel (b) is for InnerQ values (grouping 't'), got {v.grouping!r}")
    B, H, r, Tq = p.shape
    D = v.codes.shape[-1]
    BT = block_tokens or ib.default_block_tokens(v.bits, v.group_size)
    geo = ib.Geometry(bits=v.bits, G=v.group_size, D=D, n_rep=r, BT=BT)
    geo.validate()
    n_blocks = max(1, pl.cdiv(Tq, BT))
    NS = num_splits or max(1, min(n_blocks, round(4 * 132 / (B * H))))
    chunk = pl.cdiv(pl.cdiv(Tq, NS), BT) * BT  # tokens per split, whole blocks
    NS = max(1, pl.cdiv(Tq, chunk))
    pp = jnp.pad(p.astype(jnp.float32), ((0, 0), (0, 0), (0, geo.NR - r), (0, 0)))
    args = [jnp.asarray(n, jnp.int32), pp, v.codes, v.scale, v.zero]
    shapes = tuple(tuple(a.shape) for a in args)
    call = _build(geo, NS, chunk, shapes, num_warps, num_stages, interpret)
    out = jnp.sum(call_quietly(call, *args, interpret=interpret)[0], axis=2)
    return out[:, :, :r]

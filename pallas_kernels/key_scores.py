"""Kernel (a): scores of the query heads against the InnerQ-packed keys, alone.

    scores[b, h, r, t] = q'[b, h, r] . k_hat[b, h, t]   for every slot t < quant_capacity

Grid (token blocks, Hkv, B); each program takes all n_rep query heads of its
kv head at once. The math is :func:`pallas_kernels.innerq_blocks.block_key_scores`:
per-code partial dots in one MMA chain (the codes never leave registers as
values: 128 + c * 2**e straight from the packed words), then each group's scale
once per (token, head) and the zero-point times the per-group query sum, which
is computed once per program.
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


def key_scores_reference(qp: jax.Array, k: QuantizedTensor) -> jax.Array:
    """Plain jnp: q' [B, H, r, D] against the dequantized keys -> [B, H, r, Tq] f32."""
    return jnp.einsum("bhrd,bhtd->bhrt", qp.astype(jnp.float32), dequantize_tensor(k),
                      precision=jax.lax.Precision.HIGHEST)


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, o_ref, *, geo: ib.Geometry, Tq: int):
    blk = pl.program_id(0)
    base = blk * geo.BT
    qexp, koff, qsum_cols = ib.expanded_query(q_ref, geo, scale=1.0)  # natural units
    kw, ks, kz = ib.load_key_block(kw_ref, ks_ref, kz_ref, base, Tq, geo)
    s = ib.block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo)  # [BT, NR]
    hh = jax.lax.broadcasted_iota(jnp.int32, (geo.NR, geo.BT), 0)
    tt = base + jax.lax.broadcasted_iota(jnp.int32, (geo.NR, geo.BT), 1)
    plgpu.store(o_ref.at[hh, tt], s.T, mask=tt < Tq)


@functools.lru_cache(maxsize=32)
def _build(geo, B, H, r, Tq, kshape, sshape, num_warps, num_stages, interpret):
    per_bh = lambda shape: pl.BlockSpec(
        (None, None) + shape[2:], lambda i, h, b: (b, h) + (0,) * (len(shape) - 2))
    return pl.pallas_call(
        functools.partial(_kernel, geo=geo, Tq=Tq),
        grid=(-(-Tq // geo.BT), H, B),
        in_specs=[per_bh((B, H, r, geo.D)), per_bh(kshape), per_bh(sshape), per_bh(sshape)],
        out_specs=pl.BlockSpec((None, None, geo.NR, Tq), lambda i, h, b: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, geo.NR, Tq), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="innerq_key_scores",
    )


def quantized_key_scores(qp: jax.Array, k: QuantizedTensor, *, interpret: bool = False,
                         block_tokens: int | None = None, num_warps: int = 4,
                         num_stages: int = 2) -> jax.Array:
    """InnerQ key scores [B, H, r, Tq] f32 (equals :func:`key_scores_reference`)."""
    if k.grouping != "d":
        raise ValueError(f"kernel (a) is for InnerQ keys (grouping 'd'), got {k.grouping!r}")
    B, H, r, D = qp.shape
    BT = block_tokens or ib.default_block_tokens(k.bits, k.group_size)
    geo = ib.Geometry(bits=k.bits, G=k.group_size, D=D, n_rep=r, BT=BT)
    geo.validate()
    Tq = k.codes.shape[2]
    view = lambda x: x.reshape(B, H, Tq // geo.P, -1)
    kw, ks, kz = view(k.codes), view(k.scale), view(k.zero)
    q = qp.astype(jnp.float32)
    call = _build(geo, B, H, r, Tq, kw.shape, ks.shape, num_warps, num_stages, interpret)
    out = call_quietly(_as_list(call), q, kw, ks, kz, interpret=interpret)[0]
    return out[:, :, :r] if geo.NR != r else out


@functools.lru_cache(maxsize=32)
def _as_list(call):
    return lambda *a: [call(*a)]

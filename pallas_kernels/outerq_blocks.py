"""OuterQ (KIVI layout) per-block math for the fused kernel, with InnerQ's tile trick.

K is grouped per channel across G tokens, V per token across G channels. The
cache still packs K along D and V along T (the reduction axes, see
:mod:`innerq_jax.layout`), so the unpack is InnerQ's: code pair j of every word
is one ``lop3`` and every pair is a partial dot product of one MMA chain
(:mod:`pallas_kernels.innerq_blocks`). What outer grouping changes is where the
scale goes. It varies along the reduction axis, so it cannot multiply a
finished group dot; it folds into the *other* operand, once per block:

Keys, a block of BT tokens in ``ngv = BT / G`` token groups (P tokens per row):
    Qexp_j[2k + i, (p, h, gt)] = q[h, ch] * s[gt, ch] * 2**-e_j      (built per block)
    acc[row, (p, h, gt)] = -128 * sum Qexp + sum_j A_j @ Qexp_j
    score[t, h] = acc[t, (h, g_t)] + sum_d q[h, d] z[g_t, d]
Values, the block's ``ng = D / G`` channel groups:
    Pexp_j[2r + i, (h, gd)] = bf16(p[t, h] * s[t, gd] * 2**-e_j)    (no block-diagonal mask)
    accV[d, (h, gd)] = -128 * sum Pexp + sum_j A_j^T @ Pexp_j
    o[d, h] = accV[d, (h, g_d)] + sum_t p[t, h] z[t, g_d]

So both layouts run the same MMAs on the same unpacked tiles. The difference
is InnerQ's: its expanded query is built once per program and its scales are
applied to the [BT, heads x groups] accumulator, while OuterQ rebuilds the
expanded query from the block's scales in every block (cpw/2 gathers and
products of a [2*Kd, NK] tile, plus their shared-memory operand stores) and
scales p per (token, channel group).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import innerq_blocks as ib
from pallas_kernels.innerq_blocks import LOG2E, _per_position, load_q
from pallas_kernels.triton_ext import dot_acc, pair_exponents, unpack_pairs_bf16


@dataclasses.dataclass(frozen=True)
class Geometry(ib.Geometry):
    """InnerQ's tile geometry with the accumulator columns of the outer layout:
    K columns (p, h, token group), V columns (h, channel group)."""

    @property
    def k_col_groups(self) -> int:  # token groups of the block
        return self.ngv

    @property
    def v_col_groups(self) -> int:  # channel groups
        return self.ng


def _query_tiles(q_ref, geo: Geometry):
    """Per program: the query part of each Qexp_j, [2Kd, NK] f32 (times 2**-e_j, zero off
    the row's token), the channel / token-group index of each entry, and q as [D, NR]."""
    Kd, NK, nw, cpw, NR, ngv = geo.Kd, geo.NK, geo.nw, geo.cpw, geo.NR, geo.ngv
    kk = jax.lax.broadcasted_iota(jnp.int32, (2 * Kd, NK), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (2 * Kd, NK), 1)
    k, i = kk // 2, kk % 2
    w, pk = k % nw, k // nw
    h, gt, pc = (col // ngv) % NR, col % ngv, col // (NR * ngv)
    tiles, chans = [], []
    for j, e in enumerate(pair_exponents(geo.bits)):
        ch = w * cpw + j + i * geo.half
        tiles.append(jnp.where(pk == pc, load_q(q_ref, h, ch) * (2.0 ** -e), 0.0))
        chans.append(ch)
    dd = jax.lax.broadcasted_iota(jnp.int32, (geo.D, NR), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (geo.D, NR), 1)
    return tiles, chans, gt, load_q(q_ref, hh, dd)


def block_key_scores(kw, ks_ref, kz_ref, base, nq, qtiles, chans, gt, qt, geo: Geometry):
    """Scores [BT, NR] (log2 units) of tokens [base, base + BT)."""
    P, NR, ngv, NK, BT, G, D = geo.P, geo.NR, geo.ngv, geo.NK, geo.BT, geo.G, geo.D
    rows = BT // P
    g0 = base // G
    ok = (g0 + gt) * G < nq
    qexp, total = [], jnp.zeros(qtiles[0].shape, jnp.float32)
    for qj, ch in zip(qtiles, chans):
        s = ib.load_scale(ks_ref, (g0 + gt, ch), ok)
        e = (qj * s).astype(jnp.bfloat16)
        total = total + e.astype(jnp.float32)
        qexp.append(e)
    acc = jnp.broadcast_to(-128.0 * jnp.sum(total, axis=0)[None, :], (rows, NK))
    for which in ib.unpack_chunks(geo):
        for j, a in zip(which, unpack_pairs_bf16(kw, geo.bits, which, geo.max_registers)):
            acc = dot_acc(acc, a.reshape(rows, 2 * geo.Kd), qexp[j])
    # sum_d q[h, d] z[gt, d] for the block's token groups
    dz = jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 0)
    gz = jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 1)
    z = ib.load_scale(kz_ref, (g0 + gz, dz), (g0 + gz) * G < nq)
    zq = jnp.sum(qt[:, :, None] * z[:, None, :], axis=0)  # [NR, ngv]
    x = acc.reshape(rows, P, NR, ngv) + zq[None, None]
    tok = (jax.lax.broadcasted_iota(jnp.int32, (rows, P, NR, ngv), 0) * P
           + jax.lax.broadcasted_iota(jnp.int32, (rows, P, NR, ngv), 1))
    gsel = jax.lax.broadcasted_iota(jnp.int32, (rows, P, NR, ngv), 3)
    s = jnp.sum(jnp.where(tok // G == gsel, x, 0.0), axis=-1)  # [rows, P, NR]
    return s.reshape(BT, NR)


def block_value_sum(vwt, vs, vz, p, geo: Geometry):
    """sum_t p_t v_hat_t of one block, [D, NR] f32.

    vwt [D, R] uint32 words (transposed); vs, vz [BT, ng] the tokens' scales / zeros;
    p [BT, NR] f32 (0 past the sequence).
    """
    BT, NR, R, D, G, ng, NV, half = geo.BT, geo.NR, geo.R, geo.D, geo.G, geo.ng, geo.NV, geo.half
    esc = _per_position(tuple(2.0 ** -e for e in pair_exponents(geo.bits)), BT, jnp.float32)
    ps = p[:, :, None] * vs.astype(jnp.float32)[:, None, :]  # [BT, NR, ng]
    pb = (ps * esc[:, None, None]).astype(jnp.bfloat16).reshape(BT, NV)
    poff = jnp.sum(pb.astype(jnp.float32), axis=0)  # [NV]
    parts = jnp.split(jnp.transpose(pb.reshape(R, 2, half, NV), (0, 1, 3, 2)), half, axis=-1)
    acc = jnp.broadcast_to(-128.0 * poff[None, :], (D, NV))
    for which in ib.unpack_chunks(geo):
        for j, a in zip(which, unpack_pairs_bf16(vwt, geo.bits, which, geo.max_registers)):
            acc = dot_acc(acc, a.reshape(D, 2 * R), parts[j].reshape(2 * R, NV))
    zs = jnp.sum(p[:, :, None] * vz.astype(jnp.float32)[:, None, :], axis=0)  # [NR, ng]
    x = acc.reshape(D, NR, ng) + zs[None]
    gsel = jax.lax.broadcasted_iota(jnp.int32, (D, NR, ng), 2)
    dch = jax.lax.broadcasted_iota(jnp.int32, (D, NR, ng), 0)
    return jnp.sum(jnp.where(dch // G == gsel, x, 0.0), axis=-1)


def _load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo: Geometry):
    D, R, cpw, BT, ng = geo.D, geo.R, geo.cpw, geo.BT, geo.ng
    d = jax.lax.broadcasted_iota(jnp.int32, (D, R), 0)
    r = base // cpw + jax.lax.broadcasted_iota(jnp.int32, (D, R), 1)
    vwt = plgpu.load(vw_ref.at[r, d], mask=r * cpw < nq, other=0)
    t = base + jax.lax.broadcasted_iota(jnp.int32, (BT, ng), 0)
    g = jax.lax.broadcasted_iota(jnp.int32, (BT, ng), 1)
    vs = ib.load_scale(vs_ref, (t, g), t < nq)
    vz = ib.load_scale(vz_ref, (t, g), t < nq)
    return vwt, vs, vz


def outerq_part(q_ref, refs, nq, start, chunk, geo: Geometry):
    """Online softmax over the quantized tokens [start, min(start + chunk, nq)), OuterQ layout."""
    kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
    qtiles, chans, gt, qt = _query_tiles(q_ref, geo)

    def scores(base):
        kw = ib.load_key_words(kw_ref, base, nq, geo)
        return block_key_scores(kw, ks_ref, kz_ref, base, nq, qtiles, chans, gt, qt, geo)

    def values(base, p):
        vwt, vs, vz = _load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
        return block_value_sum(vwt, vs, vz, p, geo)

    return ib.online_softmax_loop(start, nq, chunk, geo, scores, values)


__all__ = ["Geometry", "LOG2E", "outerq_part"]

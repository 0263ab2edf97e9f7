"""OuterQ (KIVI layout) per-block math for the fused kernel: same structure, outer groups.

K is grouped per channel across G tokens and packed along T; V is grouped per
token across G channels and packed along D. In both the scale varies along the
dot product's reduction axis, so it cannot be applied once per partial dot as
InnerQ does. It is folded into the *other* operand instead, never into the
codes (no dequantization), as the reference does:

    keys:   score[t, h] = 2**-e_t * sum_d c[t, d] * (s[g_t, d] q[h, d])  + sum_d z[g_t, d] q[h, d]
    values: o[h, d]    = 2**-e_d * sum_t (p[h, t] s[t, g_d]) * c[t, d]  + sum_t p[h, t] z[t, g_d]

with the same inline-PTX unpack (codes 128 + c * 2**e) and the same online
softmax. The folded operand is block-diagonal: columns (h, token group) for
keys, rows (h, channel group) for values, of which each token / channel uses
one. Why not the InnerQ tile trick: splitting a word into its codes splits the
*output* axis here (tokens for K, channels for V), not the reduction axis, so
the per-code products are not partial sums of one accumulator; the codes are
interleaved back into a natural [tokens, D] tile (``_interleave``), which Triton
moves through shared memory before the MMA. That extra traffic is the price of
outer grouping in this kernel family.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.innerq_blocks import NEG, _per_position, load_q, next_pow2
from pallas_kernels.triton_ext import code_exponents, dot_acc, unpack_codes_bf16


@dataclasses.dataclass(frozen=True)
class Geometry:
    bits: int
    G: int
    D: int
    n_rep: int
    BT: int
    unpack_chunk: int = 0  # unused: the outer layout unpacks whole words
    max_registers: int = 0

    @property
    def cpw(self) -> int:
        return 32 // self.bits

    @property
    def nw(self) -> int:  # V words per token
        return self.D // self.cpw

    @property
    def R(self) -> int:  # K word rows per block
        return self.BT // self.cpw

    @property
    def ngv(self) -> int:  # key (token) groups per block
        return self.BT // self.G

    @property
    def ng(self) -> int:  # value (channel) groups per token
        return self.D // self.G

    @property
    def NR(self) -> int:
        nr = next_pow2(self.n_rep)
        nr = max(nr, next_pow2(-(-16 // self.ngv)))
        return max(nr, next_pow2(-(-16 // self.ng)))

    def validate(self) -> None:
        if self.D % self.G or self.D % 32:
            raise ValueError(f"head_dim={self.D} must be a multiple of 32 and of G={self.G}")
        if self.BT % self.G or self.BT & (self.BT - 1) or self.BT < 16:
            raise ValueError(f"block_tokens={self.BT} must be a power of two multiple of G={self.G}")
        if self.nw & (self.nw - 1):
            raise ValueError(f"head_dim={self.D} gives {self.nw} value words per token; need a power of two")


def default_block_tokens(bits: int, G: int) -> int:
    return max(128, G)


DEFAULT_MAX_REGISTERS = 0  # ptxas decides (the natural-tile path needs its registers)


def kernel_operands(layer, geo: Geometry) -> list[jax.Array]:
    k, v = layer.k, layer.v
    if k.grouping != "t" or v.grouping != "d":
        raise ValueError(f"OuterQ kernels need K grouping 't' and V grouping 'd', got {k.grouping}/{v.grouping}")
    return [k.codes, k.scale, k.zero, v.codes, v.scale, v.zero]


def _interleave(parts):
    """cpw arrays [..., n] -> [..., n, cpw] with part j at index j (a join tree)."""
    if len(parts) == 1:
        return parts[0][..., None]
    if len(parts) == 2:
        return jnp.stack(parts, axis=-1)
    return jnp.stack([_interleave(parts[0::2]), _interleave(parts[1::2])], axis=-1).reshape(
        parts[0].shape + (len(parts),)
    )


def _row_token(geo: Geometry, n: int):
    """Row i of a block tile holds token cpw * (i % R) + i // R (code-major order)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)
    return geo.cpw * (i % geo.R) + i // geo.R, i // geo.R


def outerq_part(q_ref, refs, nq, start, chunk, geo: Geometry):
    """Online softmax over the quantized tokens [start, min(start + chunk, nq)), OuterQ layout."""
    kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
    BT, NR, D, G, cpw, R, ngv, ng, nw = (geo.BT, geo.NR, geo.D, geo.G, geo.cpw, geo.R,
                                          geo.ngv, geo.ng, geo.nw)
    exps = code_exponents(geo.bits)
    dd = jax.lax.broadcasted_iota(jnp.int32, (D, NR), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (D, NR), 1)
    qt = load_q(q_ref, hh, dd)  # [D, NR] log2 units
    t_row, j_row = _row_token(geo, BT)  # [BT, 1]
    esc_row = _per_position(tuple(2.0 ** -e for e in exps), cpw, jnp.float32)  # [cpw] by code j
    jj = jax.lax.broadcasted_iota(jnp.int32, (BT, cpw), 1)
    esc_k = jnp.sum(jnp.where(jj == j_row, esc_row[None, :], 0.0), axis=1)[:, None]  # [BT, 1]
    g_row = t_row // G  # local key group of each row
    gk = jax.lax.broadcasted_iota(jnp.int32, (BT, NR, ngv), 2)
    dcol = jax.lax.broadcasted_iota(jnp.int32, (NR, ng, D), 2)
    gcol = jax.lax.broadcasted_iota(jnp.int32, (NR, ng, D), 1)
    esc_d = _per_position(tuple(2.0 ** -e for e in exps), D, jnp.float32)  # channel d -> 2**-e
    n = jnp.clip(nq - start, 0, chunk)

    def body(i, carry):
        m, lacc, o = carry
        base = start + i * BT
        # ---- keys: codes [BT, D] (rows in code-major order) @ (q * s) [D, (h, g)]
        r = base // cpw + jax.lax.broadcasted_iota(jnp.int32, (R, D), 0)
        dk = jax.lax.broadcasted_iota(jnp.int32, (R, D), 1)
        kw = plgpu.load(kw_ref.at[r, dk], mask=r * cpw < nq, other=0)  # [R, D]
        codes = _interleave(unpack_codes_bf16(kw, geo.bits, None, geo.max_registers))  # [R, D, cpw]
        codes = jnp.transpose(codes, (2, 0, 1)).reshape(BT, D)
        g = base // G + jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 1)
        dg = jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 0)
        okg = g * G < nq
        kst = plgpu.load(ks_ref.at[g, dg], mask=okg, other=0).astype(jnp.float32)  # [D, ngv]
        kzt = plgpu.load(kz_ref.at[g, dg], mask=okg, other=0).astype(jnp.float32)
        qs = (qt[:, :, None] * kst[:, None, :]).astype(jnp.bfloat16).reshape(D, NR * ngv)
        koff = 128.0 * jnp.sum(qs.astype(jnp.float32), axis=0)  # [NR*ngv]
        acc = dot_acc(jnp.broadcast_to(-koff[None, :], (BT, NR * ngv)), codes, qs)
        zterm = jnp.sum(qt[:, :, None] * kzt[:, None, :], axis=0)  # [NR, ngv]
        x = acc.reshape(BT, NR, ngv) * esc_k[:, :, None] + zterm[None]
        s = jnp.sum(jnp.where(gk == g_row[:, :, None], x, 0.0), axis=-1)  # [BT, NR]
        tok = base + t_row
        s = jnp.where(tok < nq, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[None, :])  # [BT, NR]
        lacc = alpha[None, :] * lacc + p
        # ---- values: (p * s) [(h, g), BT] @ codes [BT, D]
        okt = tok < nq
        cw = jax.lax.broadcasted_iota(jnp.int32, (BT, nw), 1)
        vw = plgpu.load(vw_ref.at[tok + 0 * cw, cw], mask=okt & (cw >= 0), other=0)  # [BT, nw]
        vcodes = _interleave(unpack_codes_bf16(vw, geo.bits, None, geo.max_registers)).reshape(BT, D)
        cg = jax.lax.broadcasted_iota(jnp.int32, (BT, ng), 1)
        vs = plgpu.load(vs_ref.at[tok + 0 * cg, cg], mask=okt & (cg >= 0), other=0).astype(jnp.float32)
        vz = plgpu.load(vz_ref.at[tok + 0 * cg, cg], mask=okt & (cg >= 0), other=0).astype(jnp.float32)
        ps = (p[:, :, None] * vs[:, None, :]).astype(jnp.bfloat16).reshape(BT, NR * ng).T
        poff = 128.0 * jnp.sum(ps.astype(jnp.float32), axis=1)  # [NR*ng]
        accv = dot_acc(jnp.broadcast_to(-poff[:, None], (NR * ng, D)), ps, vcodes)
        zt = jnp.sum(p[:, :, None] * vz[:, None, :], axis=0)  # [NR, ng]
        y = accv.reshape(NR, ng, D) * esc_d[None, None, :] + zt[:, :, None]
        ob = jnp.sum(jnp.where(gcol == dcol // G, y, 0.0), axis=1)  # [NR, D]
        o = alpha[:, None] * o + ob
        return m_new, lacc, o

    init = (jnp.full((NR,), NEG, jnp.float32), jnp.zeros((BT, NR), jnp.float32),
            jnp.zeros((NR, D), jnp.float32))
    m, lacc, o = jax.lax.fori_loop(0, pl.cdiv(n, BT), body, init)
    return o, m, jnp.sum(lacc, axis=0)

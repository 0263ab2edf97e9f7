"""The per-block math of the InnerQ kernels, shared by kernels (a), (b) and (c).

Inner grouping lets every packed word be split into its ``cpw = 32 // bits``
codes *without changing the tensor's shape*: code j of every word of a tile is
one elementwise function of the tile (:func:`unpack_codes_bf16`). Because the
codes of a word sit along the reduction axis (K: D, V: T), the products of one
code position j are a partial dot product, and the cpw partial dots accumulate
in one MMA accumulator. Triton then loads the words straight into the MMA
operand layout and never moves the unpacked codes through shared memory.

Keys (grouping ``d``), a block of BT tokens:
    words [BT/P, P*nw]: P tokens per row, so that the MMA's K dimension is 16
    acc[row, (p, h, g)] = -koff + sum_j A_j[row, :] @ Qexp_j   (one MMA chain)
    A_j = 128 + c_j * 2**e_j (bf16, exact); Qexp_j[(p', w), (p, h, g)] =
    q[h, w*cpw + j] * 2**-e_j where p' == p and channel w*cpw+j is in group g.
    koff = 128 * sum_j,k Qexp_j (the codes' offset, in the accumulator's initial value)
    score[t, h] = sum_g s[t, g] * acc + z[t, g] * sum(q_g)
  The per-group query sums and the offset are computed once per program; each
  group's scale is applied once per (token, head, group).

Values (grouping ``t``), the same BT tokens (R = BT / cpw word rows):
    words^T [D, R]; A_j^T = 128 + c_j * 2**e_j for token cpw*r + j
    accV[d, (h, g)] = sum_j A_j^T @ Pexp_j,  Pexp_j[r, (h, g)] =
    bf16(p[cpw*r + j, h] * 2**-e_j) if token cpw*r+j is in group g, else 0
    o[d, h] = sum_g s[g, d] * (accV - 128 * poff[g, h]) + z[g, d] * psum[g, h]
  The per-group sums of p (psum, and poff of the bf16 operand) are computed
  once per block and shared by every channel.

Scores are in log2 units (the wrapper multiplies q by log2(e)), so the
softmax uses exp2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton_ext import (
    code_exponents,
    dot_acc,
    unpack_codes_bf16,
)

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": exp2(NEG - m) == 0 and NEG - NEG is not NaN


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static tile sizes of the InnerQ kernels for one (bits, G, D, n_rep, BT)."""

    bits: int
    G: int
    D: int
    n_rep: int
    BT: int  # tokens per block

    @property
    def cpw(self) -> int:  # codes per uint32 word
        return 32 // self.bits

    @property
    def nw(self) -> int:  # K words per token
        return self.D // self.cpw

    @property
    def P(self) -> int:  # tokens per K row, so the MMA K dimension is >= 16
        return max(1, 16 // self.nw)

    @property
    def Kd(self) -> int:
        return self.P * self.nw

    @property
    def ng(self) -> int:  # key groups per token
        return self.D // self.G

    @property
    def R(self) -> int:  # V word rows per block
        return self.BT // self.cpw

    @property
    def ngv(self) -> int:  # value groups per block
        return self.BT // self.G

    @property
    def NR(self) -> int:
        """Query heads per kv head, padded to a power of two so that both MMA
        N dimensions (K: P*NR*ng, V: NR*ngv) are at least 16."""
        nr = next_pow2(self.n_rep)
        nr = max(nr, next_pow2(-(-16 // (self.P * self.ng))))
        return max(nr, next_pow2(-(-16 // self.ngv)))

    @property
    def NK(self) -> int:
        return self.P * self.NR * self.ng

    @property
    def NV(self) -> int:
        return self.NR * self.ngv

    def validate(self) -> None:
        if self.D % self.G or self.D % 32:
            raise ValueError(f"head_dim={self.D} must be a multiple of 32 and of G={self.G}")
        if self.BT % self.G or self.BT % (16 * self.cpw) or self.BT & (self.BT - 1):
            raise ValueError(
                f"block_tokens={self.BT} must be a power of two and a multiple of "
                f"G={self.G} and of 16 * codes_per_word = {16 * self.cpw}"
            )
        if self.Kd & (self.Kd - 1):
            raise ValueError(f"head_dim={self.D} gives {self.nw} key words per token; need a power of two")


def default_block_tokens(bits: int, G: int) -> int:
    return max(256 if bits == 2 else 128, G)


def _per_position(values: tuple, n: int, dtype) -> jax.Array:
    """[n] array whose entry i is values[i % len(values)], built from iota (no captured constants)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0) % len(values)
    out = jnp.zeros((n,), dtype)
    for j, v in enumerate(values):
        out = jnp.where(idx == j, jnp.asarray(v, dtype), out)
    return out


# --------------------------------------------------------------------- keys
def expanded_query(q_ref, geo: Geometry):
    """Per-program query operands: ([Qexp_j] bf16 [Kd, NK], koff [NK], qsum_cols [NK]).

    q_ref: [NR, D] f32 (log2-scaled). qsum_cols[(p, h, g)] = sum of q[h] over group g.
    """
    Kd, NK, nw, cpw, ng, NR, G = geo.Kd, geo.NK, geo.nw, geo.cpw, geo.ng, geo.NR, geo.G
    k = jax.lax.broadcasted_iota(jnp.int32, (Kd, NK), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (Kd, NK), 1)
    w, pk = k % nw, k // nw
    h, g, pc = (col // ng) % NR, col % ng, col // (NR * ng)
    exps = code_exponents(geo.bits)
    qexp = []
    total = jnp.zeros((Kd, NK), jnp.float32)
    for j in range(cpw):
        ch = w * cpw + j
        vals = q_ref[h, ch]  # gather [Kd, NK]
        use = (pk == pc) & (ch // G == g)
        qj = jnp.where(use, vals * (2.0 ** -exps[j]), 0.0).astype(jnp.bfloat16)
        total = total + qj.astype(jnp.float32)
        qexp.append(qj)
    koff = 128.0 * jnp.sum(total, axis=0)  # [NK]
    # sum of q over each group, laid out like the accumulator columns
    dd = jax.lax.broadcasted_iota(jnp.int32, (G, NK), 0)
    c2 = jax.lax.broadcasted_iota(jnp.int32, (G, NK), 1)
    qg = q_ref[(c2 // ng) % NR, (c2 % ng) * G + dd]  # [G, NK]
    qsum_cols = jnp.sum(qg, axis=0)
    return qexp, koff, qsum_cols


def block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo: Geometry) -> jax.Array:
    """Scores [BT, NR] (log2 units) of one block.

    kw [BT/P, Kd] uint32 words; ks, kz [BT/P, P*ng] scale / zero (any float).
    """
    P, NR, ng, NK, BT = geo.P, geo.NR, geo.ng, geo.NK, geo.BT
    rows = BT // P
    codes = unpack_codes_bf16(kw, geo.bits)
    # the accumulator starts at -128 * sum_j,k Qexp_j: the codes' offset costs nothing
    acc = jnp.broadcast_to(-koff[None, :], (rows, NK))
    for j, a in enumerate(codes):
        acc = dot_acc(acc, a, qexp[j])
    bcast = lambda x: jnp.broadcast_to(  # noqa: E731  [rows, P*ng] -> [rows, NK]
        x.astype(jnp.float32).reshape(rows, P, 1, ng), (rows, P, NR, ng)
    ).reshape(rows, NK)
    x = bcast(ks) * acc + bcast(kz) * qsum_cols[None, :]
    s = jnp.sum(x.reshape(rows, P * NR, ng), axis=-1)  # [rows, P*NR]
    return s.reshape(BT, NR)


# ------------------------------------------------------------------- values
def value_operands(p: jax.Array, geo: Geometry):
    """From p [BT, NR] f32: ([Pexp_j] bf16 [R, NV], psum [ngv, NR], poff [ngv, NR])."""
    BT, NR, R, cpw, ngv, G = geo.BT, geo.NR, geo.R, geo.cpw, geo.ngv, geo.G
    esc = _per_position(tuple(2.0 ** -e for e in code_exponents(geo.bits)), BT, jnp.float32)
    pb = (p * esc[:, None]).astype(jnp.bfloat16)  # [BT, NR]
    psum = jnp.sum(p.reshape(ngv, G, NR), axis=1)
    poff = jnp.sum(pb.astype(jnp.float32).reshape(ngv, G, NR), axis=1)
    parts = jnp.split(jnp.swapaxes(pb.reshape(R, cpw, NR), 1, 2), cpw, axis=-1)
    r_idx = jax.lax.broadcasted_iota(jnp.int32, (R, NR, ngv), 0)
    g_idx = jax.lax.broadcasted_iota(jnp.int32, (R, NR, ngv), 2)
    in_group = r_idx // (G // cpw) == g_idx
    zero = jnp.zeros((), jnp.bfloat16)
    pexp = [
        jnp.where(in_group, x.reshape(R, NR)[:, :, None], zero).reshape(R, geo.NV) for x in parts
    ]
    return pexp, psum, poff


def block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo: Geometry) -> jax.Array:
    """sum_t p_t v_hat_t of one block, [D, NR] f32.

    vwt [D, R] uint32 words (transposed); vst, vzt [D, ngv] scale / zero.
    """
    D, NR, ngv = geo.D, geo.NR, geo.ngv
    codes = unpack_codes_bf16(vwt, geo.bits)
    acc = jnp.broadcast_to(-128.0 * poff.T.reshape(1, geo.NV), (D, geo.NV))
    for j, a in enumerate(codes):
        acc = dot_acc(acc, a, pexp[j])
    vst = vst.astype(jnp.float32)[:, None, :]
    vzt = vzt.astype(jnp.float32)[:, None, :]
    x = vst * acc.reshape(D, NR, ngv) + vzt * psum.T[None]
    return jnp.sum(x, axis=-1)


# -------------------------------------------------------------------- loads
def load_key_block(kw_ref, ks_ref, kz_ref, base, nq, geo: Geometry):
    """Words / scales / zeros of tokens [base, base + BT); rows past nq read as 0."""
    rows = geo.BT // geo.P
    r0 = base // geo.P
    ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) * geo.P < nq
    kw = plgpu.load(kw_ref.at[pl.ds(r0, rows), :], mask=jnp.broadcast_to(ok, (rows, geo.Kd)), other=0)
    sc = (rows, geo.P * geo.ng)
    ks = plgpu.load(ks_ref.at[pl.ds(r0, rows), :], mask=jnp.broadcast_to(ok, sc), other=0)
    kz = plgpu.load(kz_ref.at[pl.ds(r0, rows), :], mask=jnp.broadcast_to(ok, sc), other=0)
    return kw, ks, kz


def load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo: Geometry):
    """Transposed words [D, R] and scales / zeros [D, ngv] of tokens [base, base + BT)."""
    D, R, ngv, cpw, G = geo.D, geo.R, geo.ngv, geo.cpw, geo.G
    d = jax.lax.broadcasted_iota(jnp.int32, (D, R), 0)
    r = base // cpw + jax.lax.broadcasted_iota(jnp.int32, (D, R), 1)
    vwt = plgpu.load(vw_ref.at[r, d], mask=r * cpw < nq, other=0)
    dg = jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 0)
    g = base // G + jax.lax.broadcasted_iota(jnp.int32, (D, ngv), 1)
    okg = g * G < nq
    vst = plgpu.load(vs_ref.at[g, dg], mask=okg, other=0)
    vzt = plgpu.load(vz_ref.at[g, dg], mask=okg, other=0)
    return vwt, vst, vzt


def kernel_operands(layer, geo: Geometry) -> list[jax.Array]:
    """The quantized-region arrays in kernel views (free reshapes of the cache layout).

    K (grouping d): codes [B, H, Tq/P, P*nw], scale / zero [B, H, Tq/P, P*ng];
    V (grouping t): codes [B, H, Tq/cpw, D], scale / zero [B, H, Tq/G, D].
    """
    k, v = layer.k, layer.v
    if k.grouping != "d" or v.grouping != "t":
        raise ValueError(f"InnerQ kernels need K grouping 'd' and V grouping 't', got {k.grouping}/{v.grouping}")
    B, H, Tq, _ = k.codes.shape
    P = geo.P
    if Tq % P:
        raise ValueError(f"quant_capacity={Tq} must be a multiple of {P}")
    view = lambda x: x.reshape(B, H, Tq // P, -1)  # noqa: E731
    return [view(k.codes), view(k.scale), view(k.zero), v.codes, v.scale, v.zero]

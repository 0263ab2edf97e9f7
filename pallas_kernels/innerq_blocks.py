"""The per-block math of the InnerQ kernels, shared by kernels (a), (b) and (c).

Inner grouping lets every packed word be split into its codes *without
changing the tile's layout*: code pair j (codes j and j + cpw/2, one in each
16-bit half of the word) of every word of a tile is one ``lop3`` of the tile
joined with itself (:func:`pallas_kernels.triton_ext.unpack_pairs_bf16`).
Because the codes of a word sit along the reduction axis (K: D, V: T), the
products of one pair are a partial dot product, and the cpw/2 partial dots
accumulate in one MMA accumulator. Triton loads the words straight into the
wgmma register-operand layout; the unpacked codes never go through shared
memory (a full unpack into a [tokens, D] tile does, see outerq_blocks).

Keys (grouping ``d``), a block of BT tokens (cpw codes per word, nw words per
token, P = max(1, 8 // nw) tokens per row so the MMA K dimension 2*P*nw >= 16):
    A_j [BT/P, 2*P*nw]: 128 + code * 2**e_j (bf16, exact), column 2k + i holding
        code j + i*cpw/2 of word k of the row
    acc[row, (p, h, g)] = -koff + sum_j A_j @ Qexp_j          (one MMA chain)
    Qexp_j[2k + i, (p, h, g)] = q[h, channel] * 2**-e_j if word k belongs to
        token p of the row and the channel is in group g, else 0
    koff = 128 * sum_j,k Qexp_j: the codes' offset, the accumulator's initial value
    score[t, h] = sum_g s[t, g] * acc + z[t, g] * sum(q_g)
  Qexp, koff and the per-group query sums are built once per program; each
  group's scale is applied once per (token, head, group).

Values (grouping ``t``), the same BT tokens (R = BT / cpw word rows):
    A_j^T [D, 2R]: column 2r + i holds token cpw*r + i*cpw/2 + j
    accV[d, (h, g)] = -128 * poff + sum_j A_j^T @ Pexp_j
    Pexp_j[2r + i, (h, g)] = bf16(p[token, h] * 2**-e_j) if the token is in
        group g of the block, else 0
    o[d, h] = sum_g s[g, d] * accV[d, (h, g)] + z[g, d] * psum[g, h]
  psum (and poff, the same sum over the bf16 operand) are computed once per
  block and shared by every channel.

Scores are in log2 units (q is multiplied by log2(e) as it is loaded), so the
softmax uses exp2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton_ext import dot_acc, pair_exponents, unpack_pairs_bf16

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
    unpack_chunk: int = 0  # codes per inline-asm unpack (0: cpw // 2); fewer = fewer live registers
    max_registers: int = 0  # cap on registers per thread (0: ptxas decides), see triton_ext
    Gk: int = 0  # key group along D when it differs from G (0: G); G stays the value group

    @property
    def KG(self) -> int:  # channels per key group
        return self.Gk or self.G

    @property
    def cpw(self) -> int:  # codes per uint32 word
        return 32 // self.bits

    @property
    def nw(self) -> int:  # K words per token
        return self.D // self.cpw

    @property
    def half(self) -> int:  # code pairs per word: (j, j + cpw/2), see triton_ext.pair_plan
        return self.cpw // 2

    @property
    def P(self) -> int:  # tokens per K row, so the MMA K dimension (2 * P * nw) is >= 16
        return max(1, 8 // self.nw)

    @property
    def Kd(self) -> int:
        return self.P * self.nw

    @property
    def ng(self) -> int:  # key groups per token
        return self.D // self.KG

    @property
    def R(self) -> int:  # V word rows per block
        return self.BT // self.cpw

    @property
    def ngv(self) -> int:  # value groups per block
        return self.BT // self.G

    @property
    def k_col_groups(self) -> int:  # groups per K accumulator column block (inner: channel groups)
        return self.ng

    @property
    def v_col_groups(self) -> int:  # groups per V accumulator column block (inner: token groups)
        return self.ngv

    @property
    def NR(self) -> int:
        """Query heads per kv head, padded to a power of two so that both MMA
        N dimensions (K: P*NR*k_col_groups, V: NR*v_col_groups) are at least 16."""
        nr = next_pow2(self.n_rep)
        nr = max(nr, next_pow2(-(-16 // (self.P * self.k_col_groups))))
        return max(nr, next_pow2(-(-16 // self.v_col_groups)))

    @property
    def NK(self) -> int:
        return self.P * self.NR * self.k_col_groups

    @property
    def NV(self) -> int:
        return self.NR * self.v_col_groups

    def validate(self) -> None:
        if self.D % self.G or self.D % self.KG or self.D % 32:
            raise ValueError(f"head_dim={self.D} must be a multiple of 32, of G={self.G} and of "
                             f"the key group {self.KG}")
        if self.BT % self.G or self.BT % (8 * self.cpw) or self.BT & (self.BT - 1):
            raise ValueError(
                f"block_tokens={self.BT} must be a power of two and a multiple of "
                f"G={self.G} and of 8 * codes_per_word = {8 * self.cpw}"
            )
        if self.Kd & (self.Kd - 1):
            raise ValueError(f"head_dim={self.D} gives {self.nw} key words per token; need a power of two")


def default_block_tokens(bits: int, G: int) -> int:
    # H200 sweep (benchmarks/KERNEL_NOTES.md): 128 tokens with 128 registers per
    # thread (4 CTAs per SM) beat 256 at B=8, T=32k and tie at B=1, T=128k
    return max(128, G)


DEFAULT_MAX_REGISTERS = 128


def fp8_bits_to_f32(b: jax.Array) -> jax.Array:
    """float8_e4m3fn values from their bits (uint8), decoded with integer arithmetic and a
    bitcast, so every value is exact on any backend (a GPU's exp2 is approximate): sign,
    4 exponent bits (bias 7), 3 mantissa bits. A normal value's exponent and mantissa move
    into float32's fields with the bias raised by 120 (127 - 7); exponent 0 is subnormal
    (m/8 * 2^-6, exact in float32); bits S.1111.111 are NaN (e4m3fn has no infinity)."""
    b = b.astype(jnp.int32)
    low = b & 0x7F
    normal = jax.lax.bitcast_convert_type((low << 20) + (120 << 23), jnp.float32)
    subnormal = (b & 7).astype(jnp.float32) * (2.0 ** -9)
    mag = jnp.where(low < 8, subnormal, normal)
    mag = jnp.where(low == 0x7F, jnp.nan, mag)
    return jnp.where(b >= 128, -mag, mag)


def load_scale(ref, idx, mask) -> jax.Array:
    """Scales or zero-points as float32, 0 where ``mask`` is off. fp8 ones arrive as their
    uint8 bits (:func:`scale_operand`): Triton cannot fill a masked fp8 load with 0."""
    x = plgpu.load(ref.at[idx], mask=mask, other=0)
    return fp8_bits_to_f32(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def scale_operand(x: jax.Array) -> jax.Array:
    """A scale / zero-point array as the kernels take it: fp8 as its uint8 bits (a free
    bitcast), others unchanged."""
    if x.dtype == jnp.float8_e4m3fn:
        return jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x


def load_q(q_ref, rows, cols, scale=LOG2E):
    """q' [r, D] (the caller's rows, unpadded) gathered at [rows, cols], times ``scale``
    (log2(e): scores in log2 units for exp2). Rows >= r (padding up to NR heads) read 0.
    """
    r = q_ref.shape[0]
    if isinstance(q_ref, ScaledQuery):  # q' = q * sigma * softmax scale, as it is gathered
        q = plgpu.load(q_ref.q_ref.at[jnp.minimum(rows, r - 1), cols], mask=rows < r, other=0)
        q = q.astype(jnp.float32) * plgpu.load(q_ref.sigma_ref.at[cols]) * q_ref.scale
    else:
        q = plgpu.load(q_ref.at[jnp.minimum(rows, r - 1), cols], mask=rows < r, other=0.0)
    return q * scale if scale != 1.0 else q


@dataclasses.dataclass(frozen=True)
class ScaledQuery:
    """The model's query heads q_ref [r, D] (any float dtype) read as q' = q * sigma *
    ``scale`` (sigma_ref [D] f32): :func:`load_q` applies them to what it gathers, in the
    order of ``innerq_jax.reference.prepare_query`` (for caches that rotate no keys)."""

    q_ref: object
    sigma_ref: object
    scale: float

    @property
    def shape(self):
        return self.q_ref.shape


def _per_position(values: tuple, n: int, dtype) -> jax.Array:
    """[n] array whose entry i is values[i % len(values)], built from iota (no captured constants)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0) % len(values)
    out = jnp.zeros((n,), dtype)
    for j, v in enumerate(values):
        out = jnp.where(idx == j, jnp.asarray(v, dtype), out)
    return out


def unpack_chunks(geo) -> list[tuple[int, ...]]:
    """Code pairs unpacked by one inline-asm call (consecutive ones share shifts).

    Each pair of a [BT, nw] word tile is 16 live registers per thread, so a
    chunk of 4 pairs keeps 64 live, all 8 would keep 128.
    """
    u = geo.unpack_chunk or 4
    return [tuple(range(i, min(i + u, geo.half))) for i in range(0, geo.half, u)]


# --------------------------------------------------------------------- keys
def expanded_query(q_ref, geo: Geometry, scale=LOG2E):
    """Per-program query operands: ([Qexp_j] bf16 [2Kd, NK], koff [NK], qsum_cols [NK]).

    Row 2k + i of Qexp_j meets code j + i * cpw/2 of word k of a K row.
    q_ref: [r, D] f32 q', times ``scale``. qsum_cols[(p, h, g)] = sum of q[h] over group g.
    """
    Kd, NK, nw, cpw, ng, NR, G = geo.Kd, geo.NK, geo.nw, geo.cpw, geo.ng, geo.NR, geo.KG
    kk = jax.lax.broadcasted_iota(jnp.int32, (2 * Kd, NK), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (2 * Kd, NK), 1)
    k, i = kk // 2, kk % 2
    w, pk = k % nw, k // nw
    h, g, pc = (col // ng) % NR, col % ng, col // (NR * ng)
    exps = pair_exponents(geo.bits)
    qexp = []
    total = jnp.zeros((2 * Kd, NK), jnp.float32)
    for j in range(geo.half):
        ch = w * cpw + j + i * geo.half
        vals = load_q(q_ref, h, ch, scale)  # gather [2Kd, NK]
        use = (pk == pc) & (ch // G == g)
        qj = jnp.where(use, vals * (2.0 ** -exps[j]), 0.0).astype(jnp.bfloat16)
        total = total + qj.astype(jnp.float32)
        qexp.append(qj)
    koff = 128.0 * jnp.sum(total, axis=0)  # [NK]
    # sum of q over each group, laid out like the accumulator columns
    dd = jax.lax.broadcasted_iota(jnp.int32, (G, NK), 0)
    c2 = jax.lax.broadcasted_iota(jnp.int32, (G, NK), 1)
    qg = load_q(q_ref, (c2 // ng) % NR, (c2 % ng) * G + dd, scale)  # [G, NK]
    qsum_cols = jnp.sum(qg, axis=0)
    return qexp, koff, qsum_cols


def block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo: Geometry) -> jax.Array:
    """Scores [BT, NR] (log2 units) of one block.

    kw [BT/P, Kd] uint32 words; ks, kz [BT/P, P*ng] scale / zero (any float).
    """
    P, NR, ng, NK, BT = geo.P, geo.NR, geo.ng, geo.NK, geo.BT
    rows = BT // P
    # the accumulator starts at -128 * sum_j,k Qexp_j: the codes' offset costs nothing
    acc = jnp.broadcast_to(-koff[None, :], (rows, NK))
    for which in unpack_chunks(geo):
        for j, a in zip(which, unpack_pairs_bf16(kw, geo.bits, which, geo.max_registers)):
            acc = dot_acc(acc, a.reshape(rows, 2 * geo.Kd), qexp[j])
    bcast = lambda x: jnp.broadcast_to(
        x.astype(jnp.float32).reshape(rows, P, 1, ng), (rows, P, NR, ng)
    ).reshape(rows, NK)
    x = bcast(ks) * acc + bcast(kz) * qsum_cols[None, :]
    s = jnp.sum(x.reshape(rows, P * NR, ng), axis=-1)  # [rows, P*NR]
    return s.reshape(BT, NR)


# ------------------------------------------------------------------- values
def value_operands(p: jax.Array, geo: Geometry):
    """From p [BT, NR] f32: ([Pexp_j] bf16 [R, NV], psum [ngv, NR], poff [ngv, NR])."""
    BT, NR, R, cpw, ngv, G, half = geo.BT, geo.NR, geo.R, geo.cpw, geo.ngv, geo.G, geo.half
    # token t = cpw * r + i * half + j meets pair j, element i: scale 2**-e_j, j = t % half
    esc = _per_position(tuple(2.0 ** -e for e in pair_exponents(geo.bits)), BT, jnp.float32)
    pb = (p * esc[:, None]).astype(jnp.bfloat16)  # [BT, NR]
    psum = jnp.sum(p.reshape(ngv, G, NR), axis=1)
    poff = jnp.sum(pb.astype(jnp.float32).reshape(ngv, G, NR), axis=1)
    parts = jnp.split(jnp.transpose(pb.reshape(R, 2, half, NR), (0, 1, 3, 2)), half, axis=-1)
    r_idx = jax.lax.broadcasted_iota(jnp.int32, (2 * R, NR, ngv), 0) // 2
    g_idx = jax.lax.broadcasted_iota(jnp.int32, (2 * R, NR, ngv), 2)
    in_group = r_idx // (G // cpw) == g_idx
    zero = jnp.zeros((), jnp.bfloat16)
    pexp = [
        jnp.where(in_group, x.reshape(2 * R, NR)[:, :, None], zero).reshape(2 * R, geo.NV)
        for x in parts
    ]
    return pexp, psum, poff


def block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo: Geometry) -> jax.Array:
    """sum_t p_t v_hat_t of one block, [D, NR] f32.

    vwt [D, R] uint32 words (transposed); vst, vzt [D, ngv] scale / zero.
    """
    D, NR, ngv = geo.D, geo.NR, geo.ngv
    acc = jnp.broadcast_to(-128.0 * poff.T.reshape(1, geo.NV), (D, geo.NV))
    for which in unpack_chunks(geo):
        for j, a in zip(which, unpack_pairs_bf16(vwt, geo.bits, which, geo.max_registers)):
            acc = dot_acc(acc, a.reshape(D, 2 * geo.R), pexp[j])
    vst = vst.astype(jnp.float32)[:, None, :]
    vzt = vzt.astype(jnp.float32)[:, None, :]
    x = vst * acc.reshape(D, NR, ngv) + vzt * psum.T[None]
    return jnp.sum(x, axis=-1)


# ----------------------------------------------------------- online softmax
def online_softmax_loop(start, nq, chunk, geo, scores, values):
    """Flash-decoding over the quantized tokens [start, min(start + chunk, nq)).

    ``scores(base)`` gives the [BT, NR] scores (log2 units) of tokens
    [base, base + BT); ``values(base, p)`` the [D, NR] sum of p-weighted values of
    the same block. Shared by both layouts; returns (o [NR, D], m [NR], l [NR]).
    """
    BT, NR, D = geo.BT, geo.NR, geo.D
    n = jnp.clip(nq - start, 0, chunk)
    tok = jax.lax.broadcasted_iota(jnp.int32, (BT, 1), 0)

    def body(i, carry):
        m, lacc, o = carry
        base = start + i * BT
        s = jnp.where(base + tok < nq, scores(base), NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[None, :])
        lacc = alpha[None, :] * lacc + p
        o = alpha[None, :] * o + values(base, p)
        return m_new, lacc, o

    init = (jnp.full((NR,), NEG, jnp.float32), jnp.zeros((BT, NR), jnp.float32),
            jnp.zeros((D, NR), jnp.float32))
    m, lacc, o = jax.lax.fori_loop(0, pl.cdiv(n, BT), body, init)
    return o.T, m, jnp.sum(lacc, axis=0)


# -------------------------------------------------------------------- loads
def _key_rows(base, nq, geo: Geometry):
    """(first row, rows, [rows, 1] in-range mask) of the K word rows of tokens [base, base + BT)."""
    rows = geo.BT // geo.P
    r0 = base // geo.P
    return r0, rows, (r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) * geo.P < nq


def load_key_words(kw_ref, base, nq, geo: Geometry):
    """K words [BT/P, Kd] of tokens [base, base + BT) (both layouts pack K along D)."""
    r0, rows, ok = _key_rows(base, nq, geo)
    return plgpu.load(kw_ref.at[pl.ds(r0, rows), :], mask=jnp.broadcast_to(ok, (rows, geo.Kd)),
                      other=0)


def load_key_block(kw_ref, ks_ref, kz_ref, base, nq, geo: Geometry):
    """Words / scales / zeros of tokens [base, base + BT); rows past nq read as 0."""
    r0, rows, ok = _key_rows(base, nq, geo)
    kw = load_key_words(kw_ref, base, nq, geo)
    sc = (rows, geo.P * geo.ng)
    ks = load_scale(ks_ref, (pl.ds(r0, rows), slice(None)), jnp.broadcast_to(ok, sc))
    kz = load_scale(kz_ref, (pl.ds(r0, rows), slice(None)), jnp.broadcast_to(ok, sc))
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
    vst = load_scale(vs_ref, (g, dg), okg)
    vzt = load_scale(vz_ref, (g, dg), okg)
    return vwt, vst, vzt

"""Fused decode attention over the quantized cache for TPUs (Pallas Mosaic TPU).

``quantized_decode_attention_tpu(qp, layer, lengths, cfg)`` equals
:func:`innerq_jax.reference.quantized_attention_core`: softmax over the bf16 sink
window, the packed quantized region and the bf16 recent ring, then the
probability-weighted values; q' already carries sigma, the rotation and the
softmax scale. Both layouts (InnerQ and OuterQ) run through the same kernel;
they differ only in where each group's scale is applied.

Grid and memory
---------------
Grid (B, Hkv, NB) over (sequence, kv head, token block); the token-block axis
is "arbitrary" and carries the online softmax (running max m, sum l and the
[heads, D] accumulator) in VMEM scratch. Step (b, h, 0) first folds in the two
bf16 windows; step (b, h, i) then adds quantized block i when it holds at least
one of the sequence's Nq tokens; the last step writes acc / l.

Lengths come in by scalar prefetch (SMEM). The index maps of the quantized
blocks clamp the block index to the sequence's last non-empty block, so the
steps past a sequence's end ask for the block already resident and the
pipeline issues no new DMA; ``pl.when`` skips their compute.

Every block is a free view of the cache arrays (:func:`kernel_views`), with
the last two dimensions whole or multiples of (8, 128):

  K and V words     [Tq/cpw, D] uint32, block [Rk, D]: word row rho holds the
                    codes of tokens cpw*rho .. cpw*rho + cpw - 1 (K: word w of
                    token cpw*rho + j at lane j*nw + w; V: token cpw*rho + j
                    in bits [bits*j, bits*(j+1)) of every lane)
  "d" scales/zeros  [Tq/cpw, cpw*D/G] bf16, block [Rk, cpw*D/G] (InnerQ keys,
                    OuterQ values: one per (token, channel group))
  "t" scales/zeros  [Tq/G, D] bf16, block [BT/G, D] (InnerQ values, OuterQ
                    keys: one per (token group, channel))

with Rk = ``block_rows`` word rows, BT = cpw * Rk tokens per block.

Per block
---------
Tokens live on lanes, heads (n_rep padded to R8 = 8k rows) on sublanes. A
block's tokens are taken in *chunk order*: chunk c of 128 tokens, then the
code position j within a word, then the word row: lane c*128 + j*Rc + rho'
holds token 128c + cpw*rho' + j (Rc = 128/cpw word rows per chunk). That order
falls out of the V words unchanged, and a 128-lane tile then holds whole
token groups (128/G of them), so per-group products stay small.

* Key codes: the words are regrouped once per block (``pltpu.einshape``, a
  lane shuffle of the packed words, 16x fewer elements than the codes) to
  [nw, BT], then every code position is one shift and mask on the vector unit,
  giving codes [D, BT] in channel order (exact small integers in bf16).
* InnerQ keys: one MXU product of the block-diagonal expanded query
  [(group, head), D] (zero outside the head's group channels) with the codes
  gives the integer-code dot of every (head, group, token); then each group's
  scale and offset are applied once: score = sum_g s * dot_g + z * sum(q_g).
* OuterQ keys: the scale varies along D, so it folds into the query, once per
  token group of each 128-token chunk: [(group, head), D] = q * s_group, then
  each token keeps the row of its own group, plus q . z_group.
* Values: V words unpack to [BT, D] rows in chunk order with one shift and
  mask per code position (a tile-preserving regroup). InnerQ: per chunk a
  block-diagonal p [(group, head), 128] @ codes [128, D], then s * dot + z *
  sum(p_group) once per (group, channel). OuterQ: p * s per (channel group,
  token) @ codes, each channel keeping its own group's row, plus p . z.
* Dots take bf16 operands with float32 accumulation; the windows use a hi/lo
  bf16 split of q and p so they keep float32 accuracy.

VMEM budget per grid step (:func:`vmem_budget`), the HBM bandwidth limits and
the sources: ``benchmarks/TPU_NOTES.md``. At the default Rk = 128 (2048 tokens
at 2 bits) the double-buffered blocks take 0.6 MiB and the block's values at
most 3.6 MiB more, against 128 MiB of VMEM per core on v5e and v6e.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import region_sizes
from innerq_jax.reference import quantized_attention_core

NEG = -1e30  # finite "minus infinity": exp(NEG - m) == 0 and NEG - NEG is not NaN
LANES = 128
SUBLANES = 8


# ------------------------------------------------------------------ geometry
@dataclasses.dataclass(frozen=True)
class TpuGeometry:
    """Static sizes of one kernel instance (see the module docstring)."""

    kind: str  # "innerq" or "outerq"
    bits: int
    G: int
    D: int
    n_rep: int
    Tq: int  # quantized token slots per sequence (cfg.quant_capacity)
    S: int  # sink slots
    W: int  # recent ring slots (R + G)
    block_rows: int  # Rk: word rows per block
    scale_dtype: str = "bfloat16"  # storage dtype of scales and zero-points

    @property
    def cpw(self) -> int:  # codes per uint32 word
        return 32 // self.bits

    @property
    def nw(self) -> int:  # key words per token
        return self.D // self.cpw

    @property
    def ng(self) -> int:  # channel groups per token
        return self.D // self.G

    @property
    def R8(self) -> int:  # query heads per kv head, padded to whole sublane tiles
        return -(-self.n_rep // SUBLANES) * SUBLANES

    @property
    def Rc(self) -> int:  # word rows per 128-token chunk
        return LANES // self.cpw

    @property
    def BT(self) -> int:  # tokens per block
        return self.cpw * self.block_rows

    @property
    def chunks(self) -> int:  # 128-token chunks per block
        return self.block_rows // self.Rc

    @property
    def groups_per_chunk(self) -> int:
        return LANES // self.G

    @property
    def num_blocks(self) -> int:
        return -(-self.Tq // self.BT)

    @property
    def block_row_unit(self) -> int:
        """block_rows must be a multiple of this: whole 128-token chunks, and
        token-group blocks ([BT/G, D] scales) with a multiple of 8 rows."""
        return math.lcm(self.Rc, SUBLANES * self.G // self.cpw)


def default_block_rows(bits: int, G: int, Tq: int) -> int:
    """128 word rows (2048 tokens at 2 bits, 1024 at 4), fewer when the whole
    quantized region is shorter, so a short cache does not compute a mostly
    empty block."""
    cpw = 32 // bits
    unit = math.lcm(LANES // cpw, SUBLANES * G // cpw)
    need = -(-Tq // cpw)
    return max(unit, min(128, -(-need // unit) * unit))


def static_validate_inputs(qp, layer: QuantLayer, lengths, cfg: CacheConfig,
                           block_rows: int | None = None) -> TpuGeometry:
    """Checks shapes, dtypes and tunables at trace time; returns the geometry.

    Shared by :func:`quantized_decode_attention_tpu` and its reference, so both
    reject the same inputs with the same messages.
    """
    if cfg.kind not in ("innerq", "outerq"):
        raise ValueError(f"cfg.kind={cfg.kind!r}; the TPU kernel needs 'innerq' or 'outerq'")
    if qp.ndim != 4:
        raise ValueError(f"qp.shape={qp.shape} must be [B, Hkv, n_rep, D]")
    B, H, r, D = qp.shape
    if layer.k_scale.shape != (B, H, D):
        raise ValueError(f"qp.shape={qp.shape} does not match the cache "
                         f"(k_scale.shape={layer.k_scale.shape}, expected {(B, H, D)})")
    if jnp.shape(lengths) != (B,):
        raise ValueError(f"lengths.shape={jnp.shape(lengths)} must be ({B},)")
    if not jnp.issubdtype(qp.dtype, jnp.floating):
        raise ValueError(f"qp.dtype={qp.dtype} must be floating point")
    k, v = layer.k, layer.v
    if (k.grouping, k.packing, v.grouping, v.packing) != (cfg.k_grouping, "d", cfg.v_grouping, "t"):
        raise ValueError(
            f"cache layout K {k.grouping}/{k.packing}, V {v.grouping}/{v.packing} does not match "
            f"cfg.kind={cfg.kind!r} (K grouping {cfg.k_grouping!r} packed along D, V grouping "
            f"{cfg.v_grouping!r} packed along T)")
    Tq = cfg.quant_capacity
    if k.codes.shape[2] != Tq:
        raise ValueError(f"cache holds {k.codes.shape[2]} quantized slots, cfg.quant_capacity={Tq}")
    if cfg.bits not in (2, 4):
        raise ValueError(f"cfg.bits={cfg.bits}; the TPU kernel supports 2 or 4")
    if D % cfg.group_size or D % 32:
        raise ValueError(f"D={D} must be a multiple of 32 and of G={cfg.group_size}")
    if cfg.group_size > LANES:
        raise ValueError(f"G={cfg.group_size} must be at most {LANES} (groups within one chunk)")
    rows = default_block_rows(cfg.bits, cfg.group_size, Tq) if block_rows is None else block_rows
    geo = TpuGeometry(kind=cfg.kind, bits=cfg.bits, G=cfg.group_size, D=D, n_rep=r, Tq=Tq,
                      S=cfg.sink, W=cfg.window, block_rows=rows, scale_dtype=cfg.scale_dtype)
    unit = geo.block_row_unit
    if not isinstance(rows, int) or rows <= 0 or rows % unit:
        raise ValueError(
            f"block_rows={rows!r} must be a positive multiple of {unit} at bits={cfg.bits}, "
            f"G={cfg.group_size}: whole 128-token chunks ({geo.Rc} word rows) and token-group "
            f"blocks of a multiple of 8 rows")
    return geo


def block_shapes(geo: TpuGeometry) -> dict[str, tuple[tuple[int, int], str]]:
    """(block shape, dtype) of every kernel operand: the wrapper builds its BlockSpecs
    from this table and the kernel checks its refs against it, so operands passed in
    the wrong order fail at trace time instead of computing garbage."""
    per_token = ((geo.block_rows, geo.cpw * geo.ng), geo.scale_dtype)  # "d"-grouped scales
    per_group = ((geo.BT // geo.G, geo.D), geo.scale_dtype)  # "t"-grouped scales
    k_scales, v_scales = (per_token, per_group) if geo.kind == "innerq" else (per_group, per_token)
    shapes = {
        "q": ((geo.R8, geo.D), "float32"),
        "kw": ((geo.block_rows, geo.D), "uint32"), "ks": k_scales, "kz": k_scales,
        "vw": ((geo.block_rows, geo.D), "uint32"), "vs": v_scales, "vz": v_scales,
        "recent_k": ((geo.W, geo.D), "bfloat16"), "recent_v": ((geo.W, geo.D), "bfloat16"),
        "o": ((geo.R8, geo.D), "float32"),
    }
    if geo.S:
        shapes |= {"sink_k": ((geo.S, geo.D), "bfloat16"), "sink_v": ((geo.S, geo.D), "bfloat16")}
    return shapes


def _check_refs(geo: TpuGeometry, refs: dict) -> None:
    for name, (shape, dtype) in block_shapes(geo).items():
        ref = refs[name]
        if tuple(ref.shape) != shape or jnp.dtype(ref.dtype) != jnp.dtype(dtype):
            raise ValueError(f"kernel operand {name}: block {tuple(ref.shape)} {ref.dtype}, "
                             f"expected {shape} {dtype}")


def _vmem_tile_bytes(rows: int, lanes: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, lanes] block: 32-bit tiles are (8, 128), 16-bit (16, 128)."""
    sub = SUBLANES * (4 // itemsize)
    return -(-rows // sub) * sub * -(-lanes // LANES) * LANES * itemsize


def vmem_budget(geo: TpuGeometry) -> dict[str, int]:
    """VMEM bytes of one grid step, by buffer (tile padding included).

    Pipelined blocks count twice (Pallas double-buffers every BlockSpec operand);
    "values" are the largest arrays the block math holds at once (Mosaic keeps
    what fits in vector registers and spills the rest to VMEM), an upper bound.
    """
    t = _vmem_tile_bytes
    d_scales = t(geo.block_rows, geo.cpw * geo.ng, 2)
    t_scales = t(geo.BT // geo.G, geo.D, 2)
    blocks = {
        "query": t(geo.R8, geo.D, 4),
        "key words": t(geo.block_rows, geo.D, 4),
        "value words": t(geo.block_rows, geo.D, 4),
        "scales and zeros": 2 * (d_scales + t_scales),
        "windows": 2 * (t(geo.W, geo.D, 2) + (t(geo.S, geo.D, 2) if geo.S else 0)),
        "output": t(geo.R8, geo.D, 4),
    }
    budget = {f"{k} (x2 buffers)": 2 * v for k, v in blocks.items()}
    budget["scratch m, l, acc"] = 2 * t(geo.R8, LANES, 4) + t(geo.R8, geo.D, 4)
    key_rows = geo.ng * geo.R8 if geo.kind == "innerq" else geo.groups_per_chunk * geo.R8
    budget["values: key codes (int32, then bf16)"] = t(geo.D, geo.BT, 4) + t(geo.D, geo.BT, 2)
    budget["values: value codes (int32, then bf16)"] = t(geo.BT, geo.D, 4) + t(geo.BT, geo.D, 2)
    budget["values: dots, scores, p"] = (t(key_rows, geo.BT, 4) + 3 * t(geo.R8, geo.BT, 4)
                                         + 2 * t(geo.ng, geo.BT, 4))
    return budget


# -------------------------------------------------------------- cache views
def kernel_views(layer: QuantLayer, geo: TpuGeometry) -> dict[str, jax.Array]:
    """The quantized region as the kernel reads it: free row-major reshapes.

    K codes [B, H, Tq, nw] -> [B, H, Tq/cpw, D]; "d"-grouped scales/zeros
    [B, H, Tq, ng] -> [B, H, Tq/cpw, cpw*ng]; V codes and "t"-grouped
    scales/zeros are used as stored.
    """
    k, v = layer.k, layer.v
    B, H = k.codes.shape[:2]
    rows = geo.Tq // geo.cpw

    def view(x, grouping):
        return x.reshape(B, H, rows, -1) if grouping == "d" else x

    return {
        "kw": k.codes.reshape(B, H, rows, geo.D),
        "ks": view(k.scale, k.grouping),
        "kz": view(k.zero, k.grouping),
        "vw": v.codes,
        "vs": view(v.scale, v.grouping),
        "vz": view(v.zero, v.grouping),
    }


# ------------------------------------------------------------- block helpers
def _lane_iota(n: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)


def _block_tokens(geo: TpuGeometry) -> jax.Array:
    """[1, BT]: the block-relative token of each lane in chunk order."""
    lam = _lane_iota(geo.BT)
    c, lane = lam // LANES, lam % LANES
    return LANES * c + geo.cpw * (lane % geo.Rc) + lane // geo.Rc


def _chunk_groups(geo: TpuGeometry) -> jax.Array:
    """[1, 128]: which of the chunk's token groups each lane's token belongs to
    (the same in every chunk: a chunk holds whole groups)."""
    lane = _lane_iota(LANES)
    return (geo.cpw * (lane % geo.Rc) + lane // geo.Rc) // geo.G


def _to_chunk_order(x: jax.Array, geo: TpuGeometry) -> jax.Array:
    """[Rk, cpw*n] (word row, (code position j, n)) -> [n, BT] in chunk order.

    A lane shuffle of the packed block (words or per-token scales), done once
    per block before anything is unpacked.
    """
    return pltpu.einshape("(cr)(jn)->n(cjr)", x, c=geo.chunks, j=geo.cpw)


def _codes(words: jax.Array, bits: int, axis: int) -> jax.Array:
    """Every code position of int32 words as a new axis ``axis`` (0 or 1), int32.

    Arithmetic shifts are fine: the mask drops the sign bits they bring in.
    """
    cpw = 32 // bits
    shape = [1] * (words.ndim + 1)
    shape[axis] = cpw
    shifts = jax.lax.broadcasted_iota(jnp.int32, tuple(shape), axis) * bits
    return (jnp.expand_dims(words, axis) >> shifts) & (2**bits - 1)


def _to_bf16(codes: jax.Array) -> jax.Array:
    return codes.astype(jnp.float32).astype(jnp.bfloat16)  # 0 .. 15: exact in bf16


def _key_codes(kw_ref, geo: TpuGeometry) -> jax.Array:
    """Key codes [D, BT] bf16: channel rows in natural order, tokens in chunk order."""
    words = jax.lax.bitcast_convert_type(kw_ref[...], jnp.int32)  # [Rk, D]
    wt = _to_chunk_order(words, geo)  # [nw, BT]
    # row (w, j) is channel w*cpw + j, the natural order; cpw (16 or 8) rows are
    # whole int32 sublane tiles, so the merge moves nothing
    return _to_bf16(_codes(wt, geo.bits, axis=1).reshape(geo.D, geo.BT))


def _value_codes(vw_ref, geo: TpuGeometry) -> jax.Array:
    """Value codes [BT, D] bf16, token rows in chunk order."""
    words = jax.lax.bitcast_convert_type(vw_ref[...], jnp.int32)  # [Rk, D]
    c = _codes(words, geo.bits, axis=0)  # [cpw (j), Rk (c, rho'), D]
    # Rc (8 or 16) rows are whole int32 tiles: the regroup only reorders tiles
    return _to_bf16(pltpu.einshape("j(cr)d->(cjr)d", c, c=geo.chunks))


def _hi_lo(x: jax.Array):
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _dot(a, b):  # a [m, k] @ b [k, n], float32 accumulation
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_nt(a, b, precision=None):  # a [m, k] . b [n, k]^T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _dot_f32_nt(a, b):  # small float32 products (offset terms), kept at float32 accuracy
    return _dot_nt(a, b, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------- key scores
def _innerq_scores(q, ct, ks_ref, kz_ref, geo: TpuGeometry) -> jax.Array:
    """Scores [R8, BT] of one block, InnerQ keys (groups of G channels of one token)."""
    R8, ng, G = geo.R8, geo.ng, geo.G
    group = _lane_iota(geo.D) // G
    # the offset sums use the same bf16 query as the dots: then a score is bf16(q) . k_hat
    # and its rounding error is that of q alone, not of the two (partly cancelling)
    # terms s * dot and z * sum(q) separately
    qb = q.astype(jnp.bfloat16).astype(jnp.float32)
    q_groups = [jnp.where(group == g, qb, 0.0) for g in range(ng)]
    # the block-diagonal expanded query: rows (group g, head h), zero off g's channels
    qexp = jnp.concatenate(q_groups, axis=0).astype(jnp.bfloat16)  # [ng*R8, D], exact
    dots = _dot(qexp, ct)  # [ng*R8, BT]: integer-code dot of every (group, head, token)
    s_t = _to_chunk_order(ks_ref[...].astype(jnp.float32), geo)  # [ng, BT]
    z_t = _to_chunk_order(kz_ref[...].astype(jnp.float32), geo)
    x = jnp.zeros((R8, geo.BT), jnp.float32)
    for g in range(ng):  # each group's scale and offset once per (token, head)
        qsum = jnp.sum(q_groups[g], axis=1, keepdims=True)  # [R8, 1]
        x = x + dots[g * R8:(g + 1) * R8] * s_t[g:g + 1] + qsum * z_t[g:g + 1]
    return x


def _outerq_scores(q, ct, ks_ref, kz_ref, geo: TpuGeometry) -> jax.Array:
    """Scores [R8, BT] of one block, OuterQ keys (groups of G tokens of one channel)."""
    R8, ngc = geo.R8, geo.groups_per_chunk
    s = ks_ref[...].astype(jnp.float32)  # [BT/G, D]
    z = kz_ref[...].astype(jnp.float32)
    group = _chunk_groups(geo)  # [1, 128]
    parts = []
    for c in range(geo.chunks):
        sc, zc = s[c * ngc:(c + 1) * ngc], z[c * ngc:(c + 1) * ngc]  # [ngc, D]
        qs = (q[None] * sc[:, None, :]).reshape(ngc * R8, geo.D).astype(jnp.bfloat16)
        dots = _dot(qs, ct[:, c * LANES:(c + 1) * LANES])  # [(group, head), 128]
        zq = _dot_f32_nt(q, zc)  # [R8, ngc]: q . z of each token group
        x = jnp.zeros((R8, LANES), jnp.float32)
        for g in range(ngc):  # each token keeps its own group's row
            x = jnp.where(group == g, dots[g * R8:(g + 1) * R8] + zq[:, g:g + 1], x)
        parts.append(x)
    return jnp.concatenate(parts, axis=1)


# --------------------------------------------------------------- value sums
def _group_rows_valid(first_token, n_rows: int, G: int, nq):
    """[n_rows, 1]: token group r of the block starts before nq."""
    r = jax.lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)
    return first_token + r * G < nq


def _innerq_values(p, cv, vs_ref, vz_ref, start, nq, geo: TpuGeometry) -> jax.Array:
    """sum_t p_t v_t [R8, D] of one block, InnerQ values (groups of G tokens of one channel)."""
    R8, ngc, G = geo.R8, geo.groups_per_chunk, geo.G
    ok = _group_rows_valid(start, geo.BT // G, G, nq)
    # rows past the cache (padding of a partial block) are garbage: keep them out
    s = jnp.where(ok, vs_ref[...].astype(jnp.float32), 0.0)  # [BT/G, D]
    z = jnp.where(ok, vz_ref[...].astype(jnp.float32), 0.0)
    group = _chunk_groups(geo)  # [1, 128]
    o = jnp.zeros((R8, geo.D), jnp.float32)
    pb = p.astype(jnp.bfloat16).astype(jnp.float32)  # dots and sums on the same bf16 p
    for c in range(geo.chunks):
        pc = pb[:, c * LANES:(c + 1) * LANES]  # [R8, 128]
        p_groups = [jnp.where(group == g, pc, 0.0) for g in range(ngc)]
        pexp = jnp.concatenate(p_groups, axis=0).astype(jnp.bfloat16)  # [(group, head), 128]
        dots = _dot(pexp, cv[c * LANES:(c + 1) * LANES])  # [(group, head), D]
        for g in range(ngc):  # each group's scale and offset once per (head, channel)
            row = c * ngc + g
            psum = jnp.sum(p_groups[g], axis=1, keepdims=True)  # [R8, 1]
            o = o + s[row:row + 1] * dots[g * R8:(g + 1) * R8] + z[row:row + 1] * psum
    return o


def _outerq_values(p, cv, vs_ref, vz_ref, valid, geo: TpuGeometry) -> jax.Array:
    """sum_t p_t v_t [R8, D] of one block, OuterQ values (groups of G channels of one token)."""
    R8, ng = geo.R8, geo.ng
    s_t = jnp.where(valid, _to_chunk_order(vs_ref[...].astype(jnp.float32), geo), 0.0)  # [ng, BT]
    z_t = jnp.where(valid, _to_chunk_order(vz_ref[...].astype(jnp.float32), geo), 0.0)
    # the scale varies along T inside a value sum: it folds into p, per channel group
    ps = (p[None] * s_t[:, None, :]).reshape(ng * R8, geo.BT).astype(jnp.bfloat16)
    dots = _dot(ps, cv)  # [(channel group, head), D]
    pz = _dot_f32_nt(p, z_t)  # [R8, ng]
    group = _lane_iota(geo.D) // geo.G
    o = jnp.zeros((R8, geo.D), jnp.float32)
    for g in range(ng):  # each channel keeps its own group's row
        o = jnp.where(group == g, dots[g * R8:(g + 1) * R8] + pz[:, g:g + 1], o)
    return o


# ------------------------------------------------------------------ windows
def _window_state(q, windows, sink_len, nq, n_recent, geo: TpuGeometry):
    """(m [R8, 1], l [R8, 1], acc [R8, D]) of the bf16 sink and recent windows."""
    q_hi, q_lo = _hi_lo(q)
    W = geo.W
    # ring slot s holds the rest token j = s (mod W) of [nq, nq + n_recent) when live
    off = (W - nq % W) % W
    pos = _lane_iota(W) + off
    pos = jnp.where(pos >= W, pos - W, pos)
    parts = [(windows["recent_k"], windows["recent_v"], pos < n_recent)]
    if "sink_k" in windows:
        parts.append((windows["sink_k"], windows["sink_v"], _lane_iota(geo.S) < sink_len))
    scores = []
    for k_ref, _, ok in parts:
        k = k_ref[...]  # [n, D] bf16
        scores.append(jnp.where(ok, _dot_nt(q_hi, k) + _dot_nt(q_lo, k), NEG))
    m = functools.reduce(jnp.maximum, [jnp.max(s, axis=1, keepdims=True) for s in scores])
    l = jnp.zeros((geo.R8, 1), jnp.float32)
    acc = jnp.zeros((geo.R8, geo.D), jnp.float32)
    for (_, v_ref, ok), s in zip(parts, scores):
        p = jnp.where(ok, jnp.exp(s - m), 0.0)
        l = l + jnp.sum(p, axis=1, keepdims=True)
        p_hi, p_lo = _hi_lo(p)
        v = v_ref[...]
        acc = acc + _dot(p_hi, v) + _dot(p_lo, v)
    return m, l, acc


# ------------------------------------------------------------------- kernel
def _decode_kernel(
    nq_ref,  # [B] int32 (SMEM, scalar prefetch): quantized tokens per sequence
    sink_len_ref,  # [B] int32 (SMEM): sink tokens per sequence
    recent_len_ref,  # [B] int32 (SMEM): live recent tokens per sequence
    q_ref,  # [R8, D] float32: q' of kv head (b, h), heads padded with zero rows
    kw_ref,  # [Rk, D] uint32: key words of block i
    ks_ref,  # innerq: [Rk, cpw*ng] per-token scales; outerq: [BT/G, D] per-group (bf16/fp16)
    kz_ref,  # same as ks_ref: zero-points
    vw_ref,  # [Rk, D] uint32: value words of block i
    vs_ref,  # innerq: [BT/G, D] per-group scales; outerq: [Rk, cpw*ng] per-token (bf16/fp16)
    vz_ref,  # same as vs_ref: zero-points
    windows,  # {"recent_k", "recent_v": [W, D] bf16, optional "sink_k", "sink_v": [S, D] bf16}
    o_ref,  # [R8, D] float32: the output of (b, h)
    m_ref,  # [R8, 128] float32 scratch: running max (lane-replicated)
    l_ref,  # [R8, 128] float32 scratch: running sum (lane-replicated)
    acc_ref,  # [R8, D] float32 scratch: unnormalised output
    *,
    geo: TpuGeometry,
):
    _check_refs(geo, dict(q=q_ref, kw=kw_ref, ks=ks_ref, kz=kz_ref, vw=vw_ref, vs=vs_ref,
                          vz=vz_ref, o=o_ref, **windows))
    b, i = pl.program_id(0), pl.program_id(2)
    nq = nq_ref[b]
    start = i * geo.BT  # first block-relative token of this block

    @pl.when(i == 0)
    def _windows():
        m, l, acc = _window_state(q_ref[...], windows, sink_len_ref[b], nq, recent_len_ref[b], geo)
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    @pl.when(start < nq)
    def _quantized():
        q = q_ref[...]
        ct = _key_codes(kw_ref, geo)  # [D, BT]
        scores = _innerq_scores if geo.kind == "innerq" else _outerq_scores
        x = scores(q, ct, ks_ref, kz_ref, geo)  # [R8, BT]
        valid = start + _block_tokens(geo) < nq  # [1, BT]
        x = jnp.where(valid, x, NEG)
        m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(x, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid, jnp.exp(x - m_new), 0.0)  # [R8, BT]
        cv = _value_codes(vw_ref, geo)  # [BT, D]
        if geo.kind == "innerq":
            o_blk = _innerq_values(p, cv, vs_ref, vz_ref, start, nq, geo)
        else:
            o_blk = _outerq_values(p, cv, vs_ref, vz_ref, valid, geo)
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True),
                                      l_ref.shape)
        acc_ref[...] = alpha * acc_ref[...] + o_blk

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[:, :1]
        # zero only where nothing is held; a NaN l (non-finite key or value) stays NaN
        o_ref[...] = jnp.where(l == 0, 0.0, acc_ref[...] / jnp.where(l == 0, 1.0, l))


def quantized_block_index(i, b, nq_ref, geo: TpuGeometry):
    """Token block fetched at step i of sequence b: i, clamped to the sequence's
    last non-empty block, so steps past its end re-use the resident block."""
    last = jnp.maximum((nq_ref[b] + geo.BT - 1) // geo.BT - 1, 0)
    return jnp.minimum(i, last)


# ------------------------------------------------------------------ wrapper
def quantized_decode_attention_tpu(
    qp: jax.Array,
    layer: QuantLayer,
    lengths: jax.Array,
    cfg: CacheConfig,
    *,
    block_rows: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Fused decode attention on a TPU; returns f32 [B, Hkv, n_rep, D] =
    ``quantized_attention_core(qp, layer, lengths, cfg)``.

    qp [B, Hkv, n_rep, D] (sigma, rotation and softmax scale folded in);
    lengths [B] int32. ``block_rows``: uint32 word rows per token block (default
    128, i.e. 2048 tokens at 2 bits; see :func:`default_block_rows`).
    ``interpret``: True or a ``pltpu.InterpretParams`` runs Pallas' TPU
    interpreter (any backend).
    """
    geo = static_validate_inputs(qp, layer, lengths, cfg, block_rows)
    B, H, r, D = qp.shape
    R8 = geo.R8
    lengths = jnp.asarray(lengths, jnp.int32)
    sizes = region_sizes(lengths, cfg)
    q = jnp.pad(qp.astype(jnp.float32), ((0, 0), (0, 0), (0, R8 - r), (0, 0)))
    views = kernel_views(layer, geo)
    windows = {"recent_k": layer.recent_k, "recent_v": layer.recent_v}
    if geo.S:
        windows |= {"sink_k": layer.sink_k, "sink_v": layer.sink_v}

    shapes = block_shapes(geo)

    def per_head(name):  # one block per (b, h), the same at every step i
        return pl.BlockSpec((None, None) + shapes[name][0], lambda b, h, i, *_: (b, h, 0, 0))

    def per_block(name):  # token block i, clamped past the sequence's end
        def index(b, h, i, nq_ref, *_):
            return b, h, quantized_block_index(i, b, nq_ref, geo), 0
        return pl.BlockSpec((None, None) + shapes[name][0], index)

    in_specs = [per_head("q")] + [per_block(n) for n in ("kw", "ks", "kz", "vw", "vs", "vz")]
    in_specs.append({name: per_head(name) for name in windows})
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, H, geo.num_blocks),
        in_specs=in_specs,
        out_specs=per_head("o"),
        scratch_shapes=[pltpu.VMEM((R8, LANES), jnp.float32),
                        pltpu.VMEM((R8, LANES), jnp.float32),
                        pltpu.VMEM((R8, D), jnp.float32)],
    )
    call = pl.pallas_call(
        functools.partial(_decode_kernel, geo=geo),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, H, R8, D), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name=f"{cfg.kind}_decode_attention_tpu",
    )
    # jax.vmap: one kernel call per batch element (lax.map). Pallas' own batching adds a
    # grid axis but not its dimension semantics, which the TPU lowering and interpreter
    # then reject (jax 0.11.2; tests/test_vmap.py)
    run = jax.custom_batching.sequential_vmap(call)
    out = run(sizes.quantized, sizes.sink, sizes.recent, q,
              views["kw"], views["ks"], views["kz"], views["vw"], views["vs"], views["vz"],
              windows)
    return out[:, :, :r]


def quantized_decode_attention_tpu_reference(qp, layer, lengths, cfg, block_rows=None):
    """The contract, behind the same input validation as the kernel."""
    static_validate_inputs(qp, layer, lengths, cfg, block_rows)
    return quantized_attention_core(qp, layer, lengths, cfg)


__all__ = [
    "TpuGeometry",
    "block_shapes",
    "default_block_rows",
    "kernel_views",
    "quantized_block_index",
    "quantized_decode_attention_tpu",
    "quantized_decode_attention_tpu_reference",
    "static_validate_inputs",
    "vmem_budget",
]

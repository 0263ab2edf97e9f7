"""The one owner of the quantized cache layout.

Per layer, sequence b and kv head h, a sequence of ``len`` tokens is split into

    [ sink: S tokens, bf16 | quantized: Nq tokens, Nq % G == 0 | recent: bf16 ]

Token t >= S is the "rest" token j = t - S. The recent region is a ring of
W = R + G slots: rest token j lives in slot j % W. Because W is a multiple of
G and flushes always take the oldest G recent tokens (a whole aligned group of
slots), the ring never needs shifting. Everything is derived from the
per-sequence length alone (:func:`region_sizes`, :func:`recent_slot_tokens`).

A quantized tensor (:class:`QuantizedTensor`) has one of two groupings:

* ``"d"``: groups of G consecutive channels of one token (InnerQ keys, OuterQ
  values). scale/zero [..., T, D/G].
* ``"t"``: groups of G consecutive tokens of one channel (InnerQ values, OuterQ
  keys). scale/zero [..., T/G, D].

and, independently, one of two packings of its codes:

* ``"d"``: codes [..., T, D*bits/32] uint32, packed along D (keys);
* ``"t"``: codes [..., T*bits/32, D] uint32, packed along T (values).

The cache packs keys along D and values along T, the reduction axes of
q.K^T and p.V, for both layouts: a kernel then splits a word into codes
that are partial sums of one dot product. For InnerQ the packing axis is the
grouping axis; for OuterQ (KIVI) the groups cross the packing axis, and its
scales fold into the other operand instead.

In both, the hybrid mask is [..., T/G, D/32] uint32: one bit per group, the D
bits of a block of G tokens in D/32 words (grouping ``d``: bit t_local*(D/G)+g;
grouping ``t``: bit d). One flush of G tokens therefore writes exactly one
row of codes-block, scales and mask in either grouping. Kernels read these
arrays as they are; the accessors below are what they may rely on.

G is the tensor's own ``group_size``: keys grouped along D may use a smaller
group than the flush (``CacheConfig.key_group_size``, e.g. 16 beside 32-token
flushes) and their own scale dtype (``key_scale_dtype``); a flush of 32 tokens
then writes 32 rows of scales and two rows of mask (:func:`rows_per_token`).
Which axis each tensor groups along is ``cfg.k_grouping`` / ``cfg.v_grouping``
(``k_axis`` / ``v_axis``); the packing stays K along D and V along T.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from innerq_jax.config import CacheConfig
from innerq_jax.quant import (
    dequantize_groups,
    pack_bits,
    pack_codes,
    quantize_groups,
    unpack_bits,
    unpack_codes,
)

Grouping = Literal["d", "t"]


class RegionSizes(NamedTuple):
    """Per-sequence token counts of each region ([B] int32 each)."""

    sink: jax.Array  # min(len, S)
    quantized: jax.Array  # Nq, a multiple of G
    recent: jax.Array  # len - sink - quantized, in [0, R + G - 1]
    rest: jax.Array  # len - sink: tokens past the sink window


def quantized_count(rest: jax.Array, cfg: CacheConfig) -> jax.Array:
    """Tokens in whole groups that have left the recent window (capped by capacity)."""
    G = cfg.group_size
    n = jnp.maximum(rest - cfg.recent, 0) // G * G
    return jnp.minimum(n, cfg.quant_capacity)


def region_sizes(lengths: jax.Array, cfg: CacheConfig) -> RegionSizes:
    lengths = jnp.asarray(lengths, jnp.int32)
    sink = jnp.minimum(lengths, cfg.sink)
    rest = lengths - sink
    nq = quantized_count(rest, cfg)
    return RegionSizes(sink, nq, rest - nq, rest)


def recent_slot_tokens(lengths: jax.Array, cfg: CacheConfig) -> tuple[jax.Array, jax.Array]:
    """Which rest token each ring slot holds, and whether that slot is live.

    Returns (token [B, W] int32, valid [B, W] bool). Slot s holds the newest
    rest token j < rest with j % W == s; it is live when j is not yet
    quantized.
    """
    sizes = region_sizes(lengths, cfg)
    s = jnp.arange(cfg.window, dtype=jnp.int32)[None, :]
    return slot_tokens(sizes.rest[:, None], sizes.quantized[:, None], s, cfg.window)


def slot_tokens(rest: jax.Array, quantized: jax.Array, slot: jax.Array, window: int):
    """:func:`recent_slot_tokens` for given rest / quantized counts and slot indices
    (broadcast together; the fused kernels call it on their own scalars and rows)."""
    j = rest - 1 - jnp.mod(rest - 1 - slot, window)
    return j, (j >= quantized) & (j >= 0)


# ------------------------------------------------------------ quantized tensor
ARRAY_FIELDS = ("codes", "scale", "zero", "mask")  # a QuantizedTensor's arrays, in order


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Packed group-quantized [..., T, D] values (see the module docstring)."""

    codes: jax.Array  # packing "d": [..., T, D*bits/32]  "t": [..., T*bits/32, D]  uint32
    scale: jax.Array  # "d": [..., T, D/G]        "t": [..., T/G, D]
    zero: jax.Array  # same shape and dtype as scale
    mask: jax.Array  # [..., T/G, D/32] uint32, bit set = symmetric group
    grouping: Grouping = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    packing: Grouping = dataclasses.field(metadata=dict(static=True))  # axis the codes pack along

    @property
    def head_dim(self) -> int:
        return self.scale.shape[-1] * (self.group_size if self.grouping == "d" else 1)

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[-2] * self.group_size

    def nbytes(self) -> dict[str, int]:
        return {f: getattr(self, f).nbytes for f in ARRAY_FIELDS}


def _check_axes(grouping, packing) -> Grouping:
    packing = grouping if packing is None else packing
    for name, v in (("grouping", grouping), ("packing", packing)):
        if v not in ("d", "t"):
            raise ValueError(f"{name}={v!r}; allowed: 'd' (along D) or 't' (along T)")
    return packing


def tensor_params(cfg: CacheConfig, which: str | None) -> tuple[int, object]:
    """(group size, scale dtype) of the cache's keys (``"k"``), values (``"v"``) or,
    for ``None``, of ``cfg.group_size`` and ``cfg.scale_dtype``.

    Keys may have their own group along D (``key_group_size``) and their own scale
    dtype (``key_scale_dtype``); the token groups a flush moves stay ``group_size``.
    """
    if which == "k":
        return cfg.k_group, cfg.key_scale_jnp_dtype
    if which in ("v", None):
        return cfg.group_size, cfg.scale_jnp_dtype
    raise ValueError(f"which={which!r}; allowed: 'k', 'v' or None")


def empty_quantized(
    batch_shape: tuple[int, ...], T: int, D: int, grouping: Grouping, cfg: CacheConfig,
    packing: Grouping | None = None, which: str | None = None,
) -> QuantizedTensor:
    """All-zero storage for T tokens (T a multiple of G); packing defaults to grouping.

    ``which`` (``"k"`` / ``"v"``) takes that tensor's group size and scale dtype
    (:func:`tensor_params`)."""
    b = cfg.bits
    G, sdt = tensor_params(cfg, which)
    packing = _check_axes(grouping, packing)
    codes_shape = (T, D * b // 32) if packing == "d" else (T * b // 32, D)
    scale_shape = (T, D // G) if grouping == "d" else (T // G, D)
    return QuantizedTensor(
        codes=jnp.zeros(batch_shape + codes_shape, jnp.uint32),
        scale=jnp.zeros(batch_shape + scale_shape, sdt),
        zero=jnp.zeros(batch_shape + scale_shape, sdt),
        mask=jnp.zeros(batch_shape + (T // G, D // 32), jnp.uint32),
        grouping=grouping,
        bits=b,
        group_size=G,
        packing=packing,
    )


def quantize_tokens(x: jax.Array, grouping: Grouping, cfg: CacheConfig,
                    packing: Grouping | None = None, which: str | None = None
                    ) -> QuantizedTensor:
    """Quantizes x [..., T, D] (T a multiple of G) into the packed layout.

    ``grouping`` says which values share a scale; ``packing`` (default: the
    grouping) which axis the codes are packed along; ``which`` (``"k"`` /
    ``"v"``) whose group size and scale dtype to use (:func:`tensor_params`).
    """
    packing = _check_axes(grouping, packing)
    *batch, T, D = x.shape
    b = cfg.bits
    G, sdt = tensor_params(cfg, which)
    if T % G:
        raise ValueError(f"quantize_tokens needs a whole number of groups: T={T}, G={G}")
    # Every group as a row of G values ([..., rows, G]), so that one 2-d form serves
    # both groupings (and Triton, which runs this inside the cache-write kernel, gets
    # two-dimensional tiles): "d" rows are (token, group) in row-major order, "t" rows
    # (token block, channel).
    if grouping == "d":
        g = x.reshape(*batch, T * (D // G), G)
    elif T == G:  # one block (the cache-write kernel's case): a 2-d transpose
        g = jnp.swapaxes(x, -1, -2)
    else:
        g = jnp.swapaxes(x.reshape(*batch, T // G, G, D), -1, -2).reshape(*batch, T // G * D, G)
    q = quantize_groups(g, b, cfg.hybrid, sdt)
    per_word = 32 // b
    if grouping == "d":
        scale, zero = (a.reshape(*batch, T, D // G) for a in (q.scale, q.zero))
        # flags in (token, group) order are the mask's bits t_local * (D/G) + g
        flags = q.symmetric.reshape(*batch, T // G, D)
        c = q.codes.reshape(*batch, T, D)
    else:
        scale, zero = (a.reshape(*batch, T // G, D) for a in (q.scale, q.zero))
        flags = q.symmetric.reshape(*batch, T // G, D)
        c = q.codes  # [..., (T/G) D, G]
    if grouping == "t" and packing == "t":  # words along each group's own tokens
        words = pack_codes(c, b, axis=-1)  # [..., (T/G) D, G / per_word]
        if T == G:  # one block (the cache-write kernel's case): a 2-d transpose
            codes = jnp.swapaxes(words, -1, -2)
        else:
            words = words.reshape(*batch, T // G, D, G // per_word)
            codes = jnp.swapaxes(words, -1, -2).reshape(*batch, T // per_word, D)
    else:
        if grouping == "t":
            c = jnp.swapaxes(c.reshape(*batch, T // G, D, G), -1, -2).reshape(*batch, T, D)
        codes = pack_codes(c, b, axis=-1 if packing == "d" else -2)
    return QuantizedTensor(codes, scale, zero, pack_bits(flags), grouping, b, G, packing)


def token_block(qt: QuantizedTensor, start: jax.Array, n: int) -> QuantizedTensor:
    """Tokens [start, start + n) of ``qt`` as a QuantizedTensor of its own.

    ``start`` may be traced; it and the static ``n`` must be multiples of G (and
    so of a packed word's tokens). Every field keeps tokens on axis -2.
    """
    if n % qt.group_size:
        raise ValueError(f"token_block needs whole groups: n={n}, G={qt.group_size}")

    def rows(field):
        num, den = rows_per_token(qt, field)
        x = getattr(qt, field)
        return jax.lax.dynamic_slice_in_dim(x, start * num // den, n * num // den, axis=x.ndim - 2)

    return dataclasses.replace(qt, **{f: rows(f) for f in ARRAY_FIELDS})


def rows_per_token(qt: QuantizedTensor, field: str) -> tuple[int, int]:
    """Rows (axis -2) of ``field`` per token, as a fraction (numerator, denominator).

    Depends on the tensor's own group size, packing and grouping only, so a key
    tensor of G=16 groups inside a cache whose flushes move 32 tokens stays
    consistent: a flush writes 32 * num / den rows of each field.
    """
    G, b = qt.group_size, qt.bits
    if field == "codes":
        return (1, 1) if qt.packing == "d" else (b, 32)
    if field in ("scale", "zero"):
        return (1, 1) if qt.grouping == "d" else (1, G)
    if field == "mask":
        return (1, G)
    raise ValueError(f"field={field!r}; allowed: codes, scale, zero, mask")


def unpack_tensor_codes(qt: QuantizedTensor) -> jax.Array:
    """Integer codes [..., T, D] uint8."""
    axis = -1 if qt.packing == "d" else -2
    return unpack_codes(qt.codes, qt.bits, axis=axis)


def expand_group_params(qt: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """Scale and zero broadcast to [..., T, D] float32 (for dequantization only)."""
    G = qt.group_size
    s, z = qt.scale.astype(jnp.float32), qt.zero.astype(jnp.float32)
    axis = -1 if qt.grouping == "d" else -2
    return jnp.repeat(s, G, axis=axis), jnp.repeat(z, G, axis=axis)


def dequantize_tensor(qt: QuantizedTensor) -> jax.Array:
    """Float32 [..., T, D] reconstruction; for tests and analysis, never the hot path."""
    c = unpack_tensor_codes(qt).astype(jnp.float32)
    s, z = expand_group_params(qt)
    return c * s + z


def symmetric_flags(qt: QuantizedTensor) -> jax.Array:
    """The hybrid mask as booleans: "d" -> [..., T, D/G]; "t" -> [..., T/G, D]."""
    flags = unpack_bits(qt.mask)  # [..., T/G, D]
    if qt.grouping == "d":
        *batch, nblk, D = flags.shape
        return flags.reshape(*batch, nblk * qt.group_size, D // qt.group_size)
    return flags


def hybrid_agreement(a: QuantizedTensor, b: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """Two quantizations of the same values (say, compiled and XLA's): where they took
    different modes of the hybrid choice (bool per value, [..., T, D]), and whether
    they decode bit for bit everywhere else (a bool). For tests and analysis."""
    flips = symmetric_flags(a) != symmetric_flags(b)
    flips = jnp.repeat(flips, a.group_size, axis=-1 if a.grouping == "d" else -2)
    bits = [jax.lax.bitcast_convert_type(dequantize_tensor(q), jnp.uint32) for q in (a, b)]
    return flips, jnp.all(flips | (bits[0] == bits[1]))


__all__ = [
    "QuantizedTensor",
    "RegionSizes",
    "dequantize_groups",
    "dequantize_tensor",
    "empty_quantized",
    "expand_group_params",
    "hybrid_agreement",
    "quantize_tokens",
    "quantized_count",
    "recent_slot_tokens",
    "region_sizes",
    "slot_tokens",
    "rows_per_token",
    "symmetric_flags",
    "tensor_params",
    "token_block",
    "unpack_tensor_codes",
]

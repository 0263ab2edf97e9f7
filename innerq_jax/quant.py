"""Group quantization in plain jnp: quantize, pack, unpack, dequantize.

A group is G consecutive values sharing one scale ``s`` and one offset ``z``;
every stored value is reconstructed as ``x_hat = s * c + z`` with an unsigned
integer code ``c``. The two modes of the spec differ only in how (s, z, c) are
chosen:

* asymmetric: z = group min, s = (max - min) / (2^b - 1), codes 0 .. 2^b - 1;
* symmetric:  s = max|x| / c0 with c0 = 2^(b-1) - 1, c = round(x / s) + c0,
  so z = -c0 * s and the grid {s * (c - c0)} contains an exact zero.

Storing the symmetric offset as ``z`` keeps one formula for every group, so the
kernels never branch on the mode; the one-bit hybrid mask still records which
mode each group uses. Scales are rounded *up* and asymmetric offsets *down* to
the storage dtype, so the stored grid always covers the group's range and no
code is clipped; a symmetric scale keeps few enough mantissa bits that
c0 * s is exact, so the stored offset -c0 * s keeps the grid's exact zero: the error of an in-range value is at most s/2 (the test suite
checks this bound with the stored s).

Non-finite inputs: a group containing NaN or Inf gets a NaN scale and
reconstructs as NaN on every backend (set explicitly: XLA's CPU max reduction
can drop a NaN, which would leave the group finite and wrong); nothing leaks
into other groups, other heads or other sequences (tested).

Packing: ``32 // bits`` codes per uint32 word, code ``i`` of a word at bits
[bits*i, bits*(i+1)). ``pack_codes`` packs along any axis, so the cache can pack
K along D and V along T with the same function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from innerq_jax.config import HybridPolicy


class QuantizedGroups(NamedTuple):
    codes: jax.Array  # [..., G] uint8, values in 0 .. 2^bits - 1
    scale: jax.Array  # [...]    scale dtype
    zero: jax.Array  # [...]    scale dtype (the additive offset z)
    symmetric: jax.Array  # [...] bool: True where the symmetric mode was chosen


def _round_up(x: jax.Array, dtype) -> jax.Array:
    """Smallest value of ``dtype`` that is >= x (x float32)."""
    r = x.astype(dtype)
    bump = jax.lax.nextafter(r, jnp.full_like(r, jnp.inf))
    return jnp.where(r.astype(jnp.float32) < x, bump, r)


def _round_down(x: jax.Array, dtype) -> jax.Array:
    """Largest value of ``dtype`` that is <= x (x float32)."""
    r = x.astype(dtype)
    drop = jax.lax.nextafter(r, jnp.full_like(r, -jnp.inf))
    return jnp.where(r.astype(jnp.float32) > x, drop, r)


def _round_up_exact_multiple(x: jax.Array, c0: int, dtype) -> jax.Array:
    """Rounds x >= 0 up to a value s of ``dtype`` whose multiple c0 * s is exact too.

    With c0 = 7 (4 bits), an 8-bit bf16 mantissa leaves 5 bits for s; then the
    stored offset -c0 * s is exact and the symmetric grid keeps its exact zero.
    """
    mant = 8 if dtype == jnp.bfloat16 else 11
    keep = mant - int(c0).bit_length() + (1 if c0 & (c0 - 1) == 0 else 0)
    m, e = jnp.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    quantum = jnp.ldexp(jnp.ones_like(x), e - keep)
    return (jnp.ceil(x / quantum) * quantum).astype(dtype)


def _safe_inverse(s: jax.Array) -> jax.Array:
    # A constant group has s == 0: every code is then 0 (asymmetric: x == z
    # exactly; symmetric: x == 0 exactly), never 0/0.
    return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def _quantize_asymmetric(x, bits, dtype):
    qmax = 2**bits - 1
    lo = jnp.min(x, axis=-1)
    hi = jnp.max(x, axis=-1)
    zero = _round_down(lo, dtype)
    scale = _round_up((hi - zero.astype(jnp.float32)) / qmax, dtype)
    inv = _safe_inverse(scale.astype(jnp.float32))
    c = jnp.round((x - zero.astype(jnp.float32)[..., None]) * inv[..., None])
    return jnp.clip(c, 0, qmax), scale, zero


def _quantize_symmetric(x, bits, dtype):
    c0 = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = _round_up_exact_multiple(amax / c0, c0, dtype)
    inv = _safe_inverse(scale.astype(jnp.float32))
    c = jnp.round(x * inv[..., None]) + c0
    zero = (-c0 * scale.astype(jnp.float32)).astype(dtype)
    return jnp.clip(c, 0, 2 * c0), scale, zero


def _reconstruct(c, scale, zero):
    return c * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]


def quantize_groups(
    x: jax.Array, bits: int, policy: HybridPolicy = "hybrid", scale_dtype=jnp.bfloat16
) -> QuantizedGroups:
    """Quantizes groups laid along the last axis of ``x`` ([..., G])."""
    x = x.astype(jnp.float32)
    if policy == "asymmetric":
        c, s, z = _quantize_asymmetric(x, bits, scale_dtype)
        sym = jnp.zeros(s.shape, bool)
    elif policy == "symmetric":
        c, s, z = _quantize_symmetric(x, bits, scale_dtype)
        sym = jnp.ones(s.shape, bool)
    elif policy == "hybrid":
        ca, sa, za = _quantize_asymmetric(x, bits, scale_dtype)
        cs, ss, zs = _quantize_symmetric(x, bits, scale_dtype)
        err_a = jnp.sum(jnp.square(x - _reconstruct(ca, sa, za)), axis=-1)
        err_s = jnp.sum(jnp.square(x - _reconstruct(cs, ss, zs)), axis=-1)
        sym = err_s < err_a  # ties go to asymmetric
        c = jnp.where(sym[..., None], cs, ca)
        s = jnp.where(sym, ss, sa)
        z = jnp.where(sym, zs, za)
    else:
        raise ValueError(f"policy={policy!r}; choose 'hybrid', 'asymmetric' or 'symmetric'")
    # NaN codes (non-finite input) become 0; the group's scale carries the NaN.
    c = jnp.where(jnp.isfinite(c), c, 0).astype(jnp.uint8)
    s = jnp.where(jnp.all(jnp.isfinite(x), axis=-1), s, jnp.nan).astype(s.dtype)
    return QuantizedGroups(c, s, z, sym)


def dequantize_groups(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """Inverse of :func:`quantize_groups`: [..., G] float32."""
    return _reconstruct(codes.astype(jnp.float32), scale, zero)


# ----------------------------------------------------------------- packing
def pack_codes(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """Packs ``32 // bits`` consecutive codes along ``axis`` into uint32 words."""
    per_word = 32 // bits
    axis = axis % codes.ndim
    n = codes.shape[axis]
    if n % per_word:
        raise ValueError(f"cannot pack {n} codes along axis {axis}: need a multiple of {per_word}")
    shape = codes.shape[:axis] + (n // per_word, per_word) + codes.shape[axis + 1 :]
    c = codes.astype(jnp.uint32).reshape(shape)
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits).reshape(
        (per_word,) + (1,) * (codes.ndim - axis - 1)
    )
    # The bit fields do not overlap, so a sum is a bitwise or.
    return jnp.sum(c << shifts, axis=axis + 1, dtype=jnp.uint32)


def unpack_codes(words: jax.Array, bits: int, axis: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: uint8 codes, ``axis`` grown ``32 // bits`` times."""
    per_word = 32 // bits
    axis = axis % words.ndim
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits).reshape(
        (per_word,) + (1,) * (words.ndim - axis - 1)
    )
    w = jnp.expand_dims(words, axis + 1)
    c = (w >> shifts) & jnp.uint32(2**bits - 1)
    shape = words.shape[:axis] + (words.shape[axis] * per_word,) + words.shape[axis + 1 :]
    return c.reshape(shape).astype(jnp.uint8)


def pack_bits(flags: jax.Array) -> jax.Array:
    """Packs booleans along the last axis (a multiple of 32) into uint32 words."""
    return pack_codes(flags.astype(jnp.uint8), 1, axis=-1)


def unpack_bits(words: jax.Array) -> jax.Array:
    return unpack_codes(words, 1, axis=-1).astype(bool)

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

Scales in fp8 (``float8_e4m3fn``, 1 byte, 4 significant bits, largest finite
448, no infinity) follow the same rules: the scale rounds up and the offset
down to the next fp8 value (computed on fp8's grid, no nextafter), the symmetric scale keeps 4 - bit_length(c0) (+1 for a power of
two) significant bits, and a scale is never rounded below fp8's smallest
subnormal (2^-9), so a tiny group's grid still covers it. Overflow: a group
whose scale or offset would exceed 448 in magnitude (a range fp8 cannot hold)
gets a NaN scale and reconstructs as NaN, exactly like a group holding a
non-finite value (the fp8 arithmetic runs on fp8's grid in float32 and only the
stored arrays are fp8: XLA's CPU compiler is very slow on chains of fp8 operations), never a saturated (wrong but finite) grid; under the hybrid
policy a mode that overflows is never chosen while the other one fits.

Non-finite inputs: a group containing NaN or Inf gets a NaN scale and
reconstructs as NaN on every backend (set explicitly: XLA's CPU max reduction
can drop a NaN, which would leave the group finite and wrong); nothing leaks
into other groups, other heads or other sequences (tested).

Exactness: every scale, offset and code is defined by exact comparisons, so it
does not depend on how a backend divides. A bf16 scale is the smallest bf16
value ``s`` whose grid reaches the group's top (``s * qmax >= max - z`` for the
asymmetric mode, ``s * c0 >= max|x|`` for the symmetric one, products that are
exact in float32), and a code is ``round_half_even((x - z) / s)`` checked
against the exact half-steps ``(c +- 0.5) * s``. A division only gives the
first guess. The bf16 path uses nothing beyond float32 arithmetic, integer
bit operations and comparisons, so the same functions run inside the cache
write kernel (:mod:`pallas_kernels.cache_update`, where a float32 division is
approximate) and give the same codes and scales there. float16 and fp8 scales
keep their rounding helpers (nextafter, frexp) and run in XLA only.

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


FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_MIN_EXP = -6  # exponent of its smallest normal, 2^-6; subnormals step by 2^-9


def _is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8)


def _is_bf16(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)


def _fp8_round_up(x: jax.Array) -> jax.Array:
    """Smallest fp8 value >= x, as float32 (NaN past +-448: fp8 has no infinity).

    Computed on fp8's grid in float32 (4 significant bits in a binade, a fixed
    step of 2^-9 below 2^-6): exact, and XLA's CPU compiler handles float32
    far better than long chains of fp8 operations. The result converts to
    fp8 exactly.
    """
    a = jnp.abs(x)
    _, e = jnp.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    quantum = jnp.ldexp(jnp.ones_like(a), jnp.maximum(e - 1, _FP8_MIN_EXP) - 3)
    r = jnp.where(x >= 0, jnp.ceil(a / quantum) * quantum, -(jnp.floor(a / quantum) * quantum))
    return jnp.where(jnp.abs(r) <= _FP8_MAX, r, jnp.nan)


def _round_up(x: jax.Array, dtype) -> jax.Array:
    """Smallest value of ``dtype`` that is >= x (x float32); fp8: float32 holding it."""
    if _is_fp8(dtype):
        return _fp8_round_up(x)
    if _is_bf16(dtype):  # bit arithmetic, no nextafter: it runs inside Triton kernels too
        return _round_up_bits(x, 8).astype(dtype)
    r = x.astype(dtype)
    bump = jax.lax.nextafter(r, jnp.full_like(r, jnp.inf))
    return jnp.where(r.astype(jnp.float32) < x, bump, r)


def _round_down(x: jax.Array, dtype) -> jax.Array:
    """Largest value of ``dtype`` that is <= x (x float32); fp8: float32 holding it."""
    if _is_fp8(dtype):
        return -_fp8_round_up(-x)
    if _is_bf16(dtype):
        return (-_round_up_bits(-x, 8)).astype(dtype)
    r = x.astype(dtype)
    drop = jax.lax.nextafter(r, jnp.full_like(r, -jnp.inf))
    return jnp.where(r.astype(jnp.float32) > x, drop, r)


def _keep_bits(c0: int, dtype) -> int:
    """Significant bits a scale of ``dtype`` keeps so that c0 * s is exact in it: the
    dtype's mantissa less c0's bits (a power of two costs none)."""
    mant = {jnp.dtype(jnp.bfloat16): 8, jnp.dtype(jnp.float16): 11,
            jnp.dtype(FP8): 4}[jnp.dtype(dtype)]
    return mant - int(c0).bit_length() + (1 if c0 & (c0 - 1) == 0 else 0)


def _round_up_exact_multiple(x: jax.Array, c0: int, dtype) -> jax.Array:
    """Rounds x >= 0 up to a value s of ``dtype`` whose multiple c0 * s is exact too
    (float16 and fp8; bf16 scales come from :func:`_smallest_scale`).

    With c0 = 7 (4 bits), an 11-bit float16 mantissa leaves 8 bits for s; then the
    stored offset -c0 * s is exact and the symmetric grid keeps its exact zero.
    With fp8 (4 significant bits) the quantum never falls below fp8's smallest
    subnormal, so a tiny scale is still representable and never rounds down.
    """
    keep = _keep_bits(c0, dtype)
    m, e = jnp.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    quantum = jnp.ldexp(jnp.ones_like(x), e - keep)
    if _is_fp8(dtype):  # float32 holding the fp8 value; NaN out of range
        quantum = jnp.maximum(quantum, 2.0 ** (_FP8_MIN_EXP - 3))
        s = jnp.ceil(x / quantum) * quantum
        return jnp.where(s <= _FP8_MAX, s, jnp.nan)
    return (jnp.ceil(x / quantum) * quantum).astype(dtype)


def _safe_inverse(s: jax.Array) -> jax.Array:
    # A constant group has s == 0: every code is then 0 (asymmetric: x == z
    # exactly; symmetric: x == 0 exactly), never 0/0.
    return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def _round_up_bits(x: jax.Array, keep: int) -> jax.Array:
    """Smallest float32 with at most ``keep`` significant bits that is >= x.

    Bit arithmetic on float32 (no division, no nextafter): the low 24 - keep
    mantissa bits are cleared, and the magnitude steps up first where x > 0 and
    bits were set. keep = 8 is bf16's grid (bf16 is float32's top 16 bits).
    NaN stays NaN; past the largest value the result is inf.
    """
    drop = 24 - keep
    low = jnp.uint32((1 << drop) - 1)
    u = jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)
    away = jnp.where((u & low) != 0, (u | low) + jnp.uint32(1), u)
    toward = u & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    mag = jax.lax.bitcast_convert_type(jnp.where(x >= 0, away, toward), jnp.float32)
    return jnp.where(jnp.isnan(x), x, jnp.where(x >= 0, mag, -mag))


def _smallest_scale(top: jax.Array, mult: int, keep: int) -> jax.Array:
    """Smallest s >= 0 with ``keep`` significant bits such that s * mult >= top.

    top >= 0 (float32); mult <= 15, so s * mult is exact in float32 and the
    comparison decides. top / mult, computed by multiplication, is only the
    first guess: it is within one step of the grid, which the checks correct.
    """
    s = _round_up_bits(top * (1.0 / mult), keep)
    step = jnp.uint32(1 << (24 - keep))
    u = jax.lax.bitcast_convert_type(s, jnp.uint32)
    up = jax.lax.bitcast_convert_type(u + step, jnp.float32)
    down = jax.lax.bitcast_convert_type(u - step, jnp.float32)
    short = s * mult < top
    return jnp.where(short, up, jnp.where((s > 0) & (down * mult >= top), down, s))


def _nearest_code(t: jax.Array, s: jax.Array, inv: jax.Array) -> jax.Array:
    """round_half_even(t / s), exactly, in float32; s >= 0 on a grid of at most 11
    significant bits, inv = 1 / s (any rounding) and 0 where s == 0 (code 0).

    The guess floor(t * inv + 0.5) is at most one off; (c +- 0.5) * s is exact
    for codes below 2^12, so comparing t with the two half-steps settles it.
    """
    c = jnp.floor(t * inv + 0.5)
    hi, lo = (c + 0.5) * s, (c - 0.5) * s
    odd = (c - 2.0 * jnp.floor(c * 0.5)) == 1.0
    up = (t > hi) | ((t == hi) & odd)
    down = (t < lo) | ((t == lo) & odd)
    return c + jnp.where(up, 1.0, 0.0) - jnp.where(down, 1.0, 0.0)


def _scale_reaching(top: jax.Array, mult: int, dtype, exact_multiple: bool) -> jax.Array:
    """The smallest scale s of ``dtype`` whose grid of ``mult`` steps reaches top >= 0
    (with ``exact_multiple``, on the coarser grid where mult * s is exact too).

    bf16: exact by comparisons (:func:`_smallest_scale`); float16 and fp8 round the
    float32 quotient up (XLA only, see the module docstring)."""
    if _is_bf16(dtype):
        keep = _keep_bits(mult, dtype) if exact_multiple else 8
        return _smallest_scale(top, mult, keep).astype(dtype)
    if exact_multiple:
        return _round_up_exact_multiple(top / mult, mult, dtype)
    return _round_up(top / mult, dtype)


def _quantize_asymmetric(x, bits, dtype):
    qmax = 2**bits - 1
    lo = jnp.min(x, axis=-1)
    hi = jnp.max(x, axis=-1)
    zero = _round_down(lo, dtype)
    scale = _scale_reaching(hi - zero.astype(jnp.float32), qmax, dtype, exact_multiple=False)
    s = scale.astype(jnp.float32)
    c = _nearest_code(x - zero.astype(jnp.float32)[..., None], s[..., None],
                      _safe_inverse(s)[..., None])
    return jnp.clip(c, 0, qmax), scale, zero


def _quantize_symmetric(x, bits, dtype):
    c0 = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = _scale_reaching(amax, c0, dtype, exact_multiple=True)  # c0 * s exact: zero exact
    s = scale.astype(jnp.float32)
    c = _nearest_code(x, s[..., None], _safe_inverse(s)[..., None]) + c0
    zero = -c0 * s
    if _is_fp8(dtype):  # float32 until the end; an offset past -448 is NaN
        return jnp.clip(c, 0, 2 * c0), scale, jnp.where(zero >= -_FP8_MAX, zero, jnp.nan)
    zero = zero.astype(dtype)
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
        if _is_fp8(scale_dtype):  # a mode out of fp8's range is never chosen over one in it
            err_a = jnp.where(jnp.isfinite(sa) & jnp.isfinite(za), err_a, jnp.inf)
            err_s = jnp.where(jnp.isfinite(ss) & jnp.isfinite(zs), err_s, jnp.inf)
        sym = err_s < err_a  # ties go to asymmetric
        c = jnp.where(sym[..., None], cs, ca)
        s = jnp.where(sym, ss, sa)
        z = jnp.where(sym, zs, za)
    else:
        raise ValueError(f"policy={policy!r}; choose 'hybrid', 'asymmetric' or 'symmetric'")
    # NaN codes (non-finite input) become 0; the group's scale carries the NaN.
    c = jnp.where(jnp.isfinite(c), c, 0).astype(jnp.uint8)
    ok = jnp.sum(jnp.where(jnp.isfinite(x), 0, 1), axis=-1) == 0  # (Triton has no all-reduce)
    if _is_fp8(scale_dtype):  # exact fp8 values held in float32 until here
        ok = ok & jnp.isfinite(s) & jnp.isfinite(z)  # overflow: NaN, like a non-finite group
        return QuantizedGroups(c, jnp.where(ok, s, jnp.nan).astype(FP8), z.astype(FP8), sym)
    s = jnp.where(ok, s, jnp.nan).astype(s.dtype)
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

"""Independent float64 numpy oracles for the test suite.

Nothing here imports the package's quantization or attention code: the spec
(../shared/docs/innerq.md) is re-implemented in numpy so tests compare two
separately written implementations. Only storage decoding (reading packed
words back) follows the documented layout.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def _bump(r: np.ndarray, up: bool) -> np.ndarray:
    """Next representable bf16 value above (up) or below r."""
    bits = r.view(np.uint16).astype(np.int32)
    neg = (bits & 0x8000) != 0
    zero = (bits & 0x7FFF) == 0
    step = np.where(neg, -1, 1) if up else np.where(neg, 1, -1)
    nb = bits + step
    # stepping away from +-0 goes to the smallest subnormal of the right sign
    nb = np.where(zero, 0x0001 if up else 0x8001, nb)
    return (nb & 0xFFFF).astype(np.uint16).view(BF16)


def bf16_round_up(x: np.ndarray) -> np.ndarray:
    r = np.asarray(x, np.float32).astype(BF16)
    return np.where(r.astype(np.float64) < x, _bump(r, True), r).astype(np.float64)


def bf16_round_down(x: np.ndarray) -> np.ndarray:
    r = np.asarray(x, np.float32).astype(BF16)
    return np.where(r.astype(np.float64) > x, _bump(r, False), r).astype(np.float64)


def quantize_asym(x: np.ndarray, bits: int):
    """Spec: z = min, s = (max - min)/(2^b - 1); bf16 storage (s up, z down)."""
    qmax = 2**bits - 1
    z = bf16_round_down(x.min(-1))
    s = bf16_round_up((x.max(-1) - z) / qmax)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    c = np.clip(np.round((x - z[..., None]) * inv[..., None]), 0, qmax)
    return c, s, z


def quantize_sym(x: np.ndarray, bits: int):
    """Spec: s = max|x| / c0, x_hat = s (c - c0)."""
    c0 = 2 ** (bits - 1) - 1
    # s keeps 8 - bitlen(c0) significant bits (c0 = 1: all 8), so c0 * s is exact
    keep = 8 - (int(c0).bit_length() - (1 if c0 & (c0 - 1) == 0 else 0))
    a = np.abs(x).max(-1) / c0
    m, e = np.frexp(a)
    quantum = np.ldexp(1.0, e - keep)
    s = np.ceil(a / quantum) * quantum
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    c = np.clip(np.round(x * inv[..., None]) + c0, 0, 2 * c0)
    z = -c0 * s
    assert np.all(z.astype(np.float32).astype(BF16).astype(np.float64) == z)
    return c, s, z


def recon(c, s, z):
    return c * s[..., None] + z[..., None]


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Layout decoding: code i of a uint32 word sits at bits [bits*i, bits*(i+1))."""
    words = np.moveaxis(np.asarray(words, np.uint64), axis, -1)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint64) * bits
    c = (words[..., None] >> shifts) & np.uint64(2**bits - 1)
    c = c.reshape(*words.shape[:-1], words.shape[-1] * per)
    return np.moveaxis(c, -1, axis).astype(np.float64)


def dequant_region(qt) -> np.ndarray:
    """Float64 [..., T, D] from a QuantizedTensor's stored arrays."""
    c = unpack_words(np.asarray(qt.codes), qt.bits, -1 if qt.packing == "d" else -2)
    s = np.asarray(qt.scale, np.float64)
    z = np.asarray(qt.zero, np.float64)
    G = qt.group_size
    axis = -1 if qt.grouping == "d" else -2
    s, z = np.repeat(s, G, axis=axis), np.repeat(z, G, axis=axis)
    return c * s + z


def hadamard(D: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < D:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(D)


def softmax_attention(q, k, v, valid):
    """q [r, D], k/v [T, D], valid [T] -> [r, D] in float64."""
    s = q @ k.T
    s = np.where(valid[None, :], s, -np.inf)
    if not valid.any():
        return np.zeros((q.shape[0], v.shape[1]))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v


def materialize(layer, b: int, h: int, length: int, cfg):
    """The stored tokens of one (sequence, head), in token order, float64.

    Returns (k [len, D], v [len, D], region labels [len]) in the stored
    (normalized / rotated) space, decoding each region by the documented
    layout: sinks, then quantized groups, then the ring slot j % (R + G).
    """
    S, G, R = cfg.sink, cfg.group_size, cfg.recent
    W = R + G
    sink = min(length, S)
    rest = length - sink
    nq = max(0, (rest - R) // G * G) if cfg.quantized else 0
    ks, vs, lab = [], [], []
    if sink:
        ks.append(np.asarray(layer.sink_k[b, h, :sink], np.float64))
        vs.append(np.asarray(layer.sink_v[b, h, :sink], np.float64))
        lab += ["sink"] * sink
    if nq:
        kq = dequant_region(_index(layer.k, b, h))[:nq]
        vq = dequant_region(_index(layer.v, b, h))[:nq]
        ks.append(kq)
        vs.append(vq)
        lab += ["quant"] * nq
    if rest - nq:
        slots = np.arange(nq, rest) % W
        ks.append(np.asarray(layer.recent_k[b, h], np.float64)[slots])
        vs.append(np.asarray(layer.recent_v[b, h], np.float64)[slots])
        lab += ["recent"] * (rest - nq)
    D = layer.sink_k.shape[-1]
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, D))  # noqa: E731
    return cat(ks), cat(vs), np.array(lab)


def _index(qt, b, h):
    import dataclasses

    return dataclasses.replace(
        qt, **{f: np.asarray(getattr(qt, f))[b, h] for f in ("codes", "scale", "zero", "mask")}
    )


def symmetric_bits(qt, b, h) -> np.ndarray:
    """The hybrid mask of one (sequence, head) as a flat bool array, per stored group."""
    words = np.asarray(qt.mask)[b, h]  # [T/G, D/32]
    return unpack_words(words, 1, -1).astype(bool)

"""Decode attention in plain jnp: the reference every kernel is checked against.

The reference computes attention in the inner-grouped form the kernels
implement, never by dequantizing the cache first. For a key group g of G
channels of token t (InnerQ, grouping ``d``):

    q . k_hat_t = sum_g  s_{t,g} * (q_g . c_{t,g})  +  z_{t,g} * sum(q_g)

and for a value group of G tokens of channel d (grouping ``t``):

    sum_t p_t v_hat_{t,d} = sum_g  s_{g,d} * (p_g . c_{g,d})  +  z_{g,d} * sum(p_g)

The integer-code products come first; each group's scale is applied once;
the sums of q (per key group) and of p (per value group) are shared by every
token and every channel. OuterQ's outer groups are handled with the same care
(the scale folds into q or p per group). Key normalization is folded into the
query: q' = sigma * (H q) with the optional rotation H (H diag(s) with the
layer's random signs s when ``rotation_signs``); the centre drops out of the
softmax, and the value rotation is undone on the output. Key and value
groupings are read from each tensor (any of "d" / "t" for either, any key
group size), so mixed layouts and G=16 keys beside G=32 flushes need nothing
more here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from innerq_jax.cache import Int8Layer, QuantLayer, hadamard
from innerq_jax.config import CacheConfig
from innerq_jax.layout import (
    recent_slot_tokens,
    region_sizes,
    token_block,
    unpack_tensor_codes,
)

_NEG = -1e30
# Tokens of the long region unpacked at a time: small next to any cache, large
# enough that the loop over blocks costs little.
REFERENCE_BLOCK_TOKENS = 512


def split_heads(q: jax.Array, H: int) -> jax.Array:
    B, Hq, D = q.shape
    if Hq % H:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={H}")
    return q.reshape(B, H, Hq // H, D)


def prepare_query(q: jax.Array, layer: QuantLayer, cfg: CacheConfig, softmax_scale: float):
    """q [B, Hq, D] -> q' [B, Hkv, Hq/Hkv, D] f32 with rotation, sigma and scale folded in."""
    H, D = layer.k_scale.shape[1], layer.k_scale.shape[2]
    qh = split_heads(q, H).astype(jnp.float32)
    if cfg.rotate_keys:
        if layer.rot_signs is not None:  # randomized Hadamard: (q * s) @ H, as the keys
            qh = qh * layer.rot_signs.astype(jnp.float32)[:, :, None, :]
        qh = qh @ hadamard(D)
    return qh * layer.k_scale[:, :, None, :] * softmax_scale


def finish_output(o: jax.Array, cfg: CacheConfig, dtype, signs: jax.Array | None = None
                  ) -> jax.Array:
    """o [B, Hkv, r, D] f32 (rotated value space) -> [B, Hq, D].

    ``signs`` [B, Hkv, D]: the layer's randomized Hadamard signs (``rot_signs``),
    undone after H (the values were stored as (v * s) @ H)."""
    B, H, r, D = o.shape
    if cfg.rotate_values:
        o = o @ hadamard(D)  # H is symmetric and orthonormal: its own inverse
        if signs is not None:
            o = o * signs.astype(jnp.float32)[:, :, None, :]
    return o.reshape(B, H * r, D).astype(dtype)


# ------------------------------------------------------------- quantized regions
def quantized_key_scores(qp: jax.Array, k) -> jax.Array:
    """Scores of q' [B, H, r, D] against the quantized keys: [B, H, r, Tq]."""
    B, H, r, D = qp.shape
    G = k.group_size
    c = unpack_tensor_codes(k).astype(jnp.float32)  # [B, H, Tq, D] exact integers
    s, z = k.scale.astype(jnp.float32), k.zero.astype(jnp.float32)
    if k.grouping == "d":  # inner: groups along D of one token
        ng = D // G
        qg = qp.reshape(B, H, r, ng, G)
        dots = jnp.einsum("bhrgi,bhtgi->bhrtg", qg, c.reshape(B, H, -1, ng, G))
        qsum = jnp.sum(qg, axis=-1)  # [B, H, r, ng], once per block
        return jnp.einsum("bhrtg,bhtg->bhrt", dots, s) + jnp.einsum("bhrg,bhtg->bhrt", qsum, z)
    # outer: groups along T of one channel; the scale folds into q per group
    qs = jnp.einsum("bhrd,bhkd->bhrkd", qp, s)  # [B, H, r, Tq/G, D]
    dots = jnp.einsum("bhrkd,bhkid->bhrki", qs, c.reshape(B, H, -1, G, D))
    offs = jnp.einsum("bhrd,bhkd->bhrk", qp, z)
    return (dots + offs[..., None]).reshape(B, H, r, -1)


def quantized_value_sum(p: jax.Array, v) -> jax.Array:
    """sum_t p_t v_hat_t over the quantized values: p [B, H, r, Tq] -> [B, H, r, D]."""
    B, H, r, Tq = p.shape
    G = v.group_size
    c = unpack_tensor_codes(v).astype(jnp.float32)  # [B, H, Tq, D]
    s, z = v.scale.astype(jnp.float32), v.zero.astype(jnp.float32)
    D = c.shape[-1]
    if v.grouping == "t":  # inner: groups along T of one channel
        pg = p.reshape(B, H, r, Tq // G, G)
        dots = jnp.einsum("bhrki,bhkid->bhrkd", pg, c.reshape(B, H, Tq // G, G, D))
        psum = jnp.sum(pg, axis=-1)  # [B, H, r, Tq/G], shared by every channel
        return jnp.einsum("bhrkd,bhkd->bhrd", dots, s) + jnp.einsum("bhrk,bhkd->bhrd", psum, z)
    # outer: groups along D of one token; the scale folds into p per token
    ng = D // G
    ps = jnp.einsum("bhrt,bhtg->bhrtg", p, s)
    dots = jnp.einsum("bhrtg,bhtgi->bhrgi", ps, c.reshape(B, H, Tq, ng, G))
    offs = jnp.einsum("bhrt,bhtg->bhrg", p, z)
    return (dots + offs[..., None]).reshape(B, H, r, D)


def blockwise_attention(
    q_shape: tuple[int, ...],
    n_tokens: int,
    region_len: jax.Array,
    score_block: Callable[[jax.Array, int], jax.Array],
    value_block: Callable[[jax.Array, int, jax.Array], jax.Array],
    windows: Sequence[tuple[jax.Array, jax.Array, jax.Array]] = (),
    block_tokens: int = REFERENCE_BLOCK_TOKENS,
    align: int = 1,
) -> jax.Array:
    """Softmax attention over a long token region read one block at a time.

    q_shape is [B, H, r, D]. The region holds ``n_tokens`` slots, of which the
    first ``region_len[b]`` are live; ``score_block(start, n)`` gives the scores
    [B, H, r, n] of slots [start, start + n) and ``value_block(start, n, e)`` the
    e-weighted values [B, H, r, D] of the same slots. ``windows`` are small
    dense parts (scores [B, H, r, w], valid broadcastable to it, values
    [B, H, w, D] f32). An online softmax (running max, sum and output) walks
    the blocks, so only one block's unpacked values and scores exist at a time
    and no temporary grows with the cache. Rows with nothing valid give zeros.
    Blocks are ``block_tokens`` long (a multiple of ``align``); the last one is
    shifted back to end at n_tokens and its slots seen before are masked.
    """
    m = jnp.full(q_shape[:3], _NEG, jnp.float32)
    for s_w, ok, _ in windows:
        m = jnp.maximum(m, jnp.max(jnp.where(ok, s_w, _NEG), axis=-1))
    l_sum = jnp.zeros(q_shape[:3], jnp.float32)
    o = jnp.zeros(q_shape, jnp.float32)
    for s_w, ok, v_w in windows:
        e_w = jnp.where(ok, jnp.exp(s_w - m[..., None]), 0.0)
        l_sum = l_sum + jnp.sum(e_w, axis=-1)
        o = o + jnp.einsum("bhrs,bhsd->bhrd", e_w, v_w)
    if n_tokens:
        blk = min(n_tokens, max(align, block_tokens // align * align))
        nblk = -(-n_tokens // blk)
        first = jnp.arange(nblk, dtype=jnp.int32) * blk  # first slot each block owns
        starts = jnp.minimum(first, n_tokens - blk)

        def step(carry, inp):
            m, l_sum, o = carry
            st, own = inp
            tok = st + jnp.arange(blk, dtype=jnp.int32)  # [blk]
            valid = ((tok >= own)[None, :] & (tok[None, :] < region_len[:, None]))
            valid = valid[:, None, None, :]  # [B, 1, 1, blk]
            s = score_block(st, blk)
            m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, _NEG), axis=-1))
            alpha = jnp.exp(m - m_new)
            e = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
            o = alpha[..., None] * o + value_block(st, blk, e)
            return (m_new, alpha * l_sum + jnp.sum(e, axis=-1), o), None

        (m, l_sum, o), _ = jax.lax.scan(step, (m, l_sum, o), (starts, first))
    return o / jnp.maximum(l_sum, 1e-30)[..., None]


def quantized_attention_core(qp: jax.Array, layer: QuantLayer, lengths: jax.Array,
                             cfg: CacheConfig, block_tokens: int = REFERENCE_BLOCK_TOKENS
                             ) -> jax.Array:
    """softmax(q' k'^T) v' over sink + quantized + recent: q' [B, H, r, D] -> f32 [B, H, r, D].

    This is the contract every fused kernel implements (q' already carries
    sigma, the rotation and the softmax scale). The quantized region is read
    ``block_tokens`` at a time (see :func:`blockwise_attention`).
    """
    sizes = region_sizes(lengths, cfg)
    S, Tq, G = cfg.sink, cfg.quant_capacity, cfg.group_size
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    _, live = recent_slot_tokens(lengths, cfg)
    windows = [
        (jnp.einsum("bhrd,bhsd->bhrs", qp, f32(layer.recent_k)), live[:, None, None, :],
         f32(layer.recent_v)),
    ]
    if S:
        windows.insert(0, (jnp.einsum("bhrd,bhsd->bhrs", qp, f32(layer.sink_k)),
                           (jnp.arange(S)[None, :] < sizes.sink[:, None])[:, None, None, :],
                           f32(layer.sink_v)))
    return blockwise_attention(
        qp.shape, Tq, sizes.quantized,
        lambda st, n: quantized_key_scores(qp, token_block(layer.k, st, n)),
        lambda st, n, e: quantized_value_sum(e, token_block(layer.v, st, n)),
        windows, block_tokens, align=G)


# ----------------------------------------------------------------- baselines
def _dense_rows(x, start, n):
    return jax.lax.dynamic_slice_in_dim(x, start, n, axis=2)


def dense_attention(qh, k, v, lengths, block_tokens: int = REFERENCE_BLOCK_TOKENS):
    """qh [B, H, r, D] (scaled); k, v [B, H, C, D] in their stored dtype -> f32 [B, H, r, D].

    The products take qh's dtype for both operands and accumulate in f32: an f32
    qh gives the exact reference, a bf16 one the bf16 einsum a TPU user runs.
    Each block is converted on its own, so the cache is never copied.
    """
    dt = qh.dtype

    def scores(st, n):
        return jnp.einsum("bhrd,bhtd->bhrt", qh, _dense_rows(k, st, n).astype(dt),
                          preferred_element_type=jnp.float32)

    def values(st, n, e):
        return jnp.einsum("bhrt,bhtd->bhrd", e.astype(dt), _dense_rows(v, st, n).astype(dt),
                          preferred_element_type=jnp.float32)

    return blockwise_attention(qh.shape, k.shape[2], lengths, scores, values,
                               block_tokens=block_tokens)


def int8_attention(qh, layer: Int8Layer, lengths, block_tokens: int = REFERENCE_BLOCK_TOKENS):
    # One scale per (token, head): it multiplies the whole score / value row.
    def scores(st, n):
        ks = _dense_rows(layer.k_scale[..., None], st, n)[..., 0].astype(jnp.float32)
        kc = _dense_rows(layer.k, st, n).astype(jnp.float32)
        return jnp.einsum("bhrd,bhtd->bhrt", qh, kc) * ks[:, :, None, :]

    def values(st, n, e):
        vs = _dense_rows(layer.v_scale[..., None], st, n)[..., 0].astype(jnp.float32)
        vc = _dense_rows(layer.v, st, n).astype(jnp.float32)
        return jnp.einsum("bhrt,bhtd->bhrd", e * vs[:, :, None, :], vc)

    return blockwise_attention(qh.shape, layer.k.shape[2], lengths, scores, values,
                               block_tokens=block_tokens)


def int8_attention_fused(qh, layer: Int8Layer, lengths):
    """The int8 cache on an accelerator: one bf16 einsum per product (f32 accumulation)
    that XLA fuses with the int8 -> bf16 conversion, so the codes are read once; the
    per-token scales multiply the score and probability rows."""
    ks, vs = layer.k_scale.astype(jnp.float32), layer.v_scale.astype(jnp.float32)
    s = jnp.einsum("bhrd,bhtd->bhrt", qh.astype(jnp.bfloat16), layer.k.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32) * ks[:, :, None, :]
    valid = (jnp.arange(layer.k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    x = jnp.where(valid, s, _NEG)
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(x - m), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30) * vs[:, :, None, :]
    return jnp.einsum("bhrt,bhtd->bhrd", p.astype(jnp.bfloat16), layer.v.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)

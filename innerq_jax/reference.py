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
query: q' = sigma * (H q) with the optional rotation H; the centre drops out of
the softmax, and the value rotation is undone on the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from innerq_jax.cache import Int8Layer, QuantLayer, hadamard
from innerq_jax.config import CacheConfig
from innerq_jax.layout import recent_slot_tokens, region_sizes, unpack_tensor_codes

_NEG = -1e30


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
        qh = qh @ hadamard(D)
    return qh * layer.k_scale[:, :, None, :] * softmax_scale


def finish_output(o: jax.Array, cfg: CacheConfig, dtype) -> jax.Array:
    """o [B, Hkv, r, D] f32 (rotated value space) -> [B, Hq, D]."""
    B, H, r, D = o.shape
    if cfg.rotate_values:
        o = o @ hadamard(D)  # H is symmetric and orthonormal: its own inverse
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


def _softmax(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax over the last axis of valid entries; all-invalid rows give zeros."""
    x = jnp.where(valid, scores, _NEG)
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(x - m), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def quantized_attention_core(qp: jax.Array, layer: QuantLayer, lengths: jax.Array,
                             cfg: CacheConfig) -> jax.Array:
    """softmax(q' k'^T) v' over sink + quantized + recent: q' [B, H, r, D] -> f32 [B, H, r, D].

    This is the contract every fused kernel implements (q' already carries
    sigma, the rotation and the softmax scale).
    """
    sizes = region_sizes(lengths, cfg)
    S, Tq = cfg.sink, cfg.quant_capacity
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    s_sink = jnp.einsum("bhrd,bhsd->bhrs", qp, f32(layer.sink_k))
    s_quant = quantized_key_scores(qp, layer.k)
    s_rec = jnp.einsum("bhrd,bhsd->bhrs", qp, f32(layer.recent_k))
    _, live = recent_slot_tokens(lengths, cfg)
    valid = jnp.concatenate(
        [
            jnp.arange(S)[None, :] < sizes.sink[:, None],
            jnp.arange(Tq)[None, :] < sizes.quantized[:, None],
            live,
        ],
        axis=-1,
    )[:, None, None, :]
    p = _softmax(jnp.concatenate([s_sink, s_quant, s_rec], axis=-1), valid)
    p_sink, p_quant, p_rec = p[..., :S], p[..., S : S + Tq], p[..., S + Tq :]
    return (
        jnp.einsum("bhrs,bhsd->bhrd", p_sink, f32(layer.sink_v))
        + quantized_value_sum(p_quant, layer.v)
        + jnp.einsum("bhrs,bhsd->bhrd", p_rec, f32(layer.recent_v))
    )


# ----------------------------------------------------------------- baselines
def dense_attention(qh, k, v, lengths):
    """qh [B, H, r, D] f32 (scaled); k, v [B, H, C, D] f32."""
    scores = jnp.einsum("bhrd,bhtd->bhrt", qh, k)
    valid = (jnp.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    return jnp.einsum("bhrt,bhtd->bhrd", _softmax(scores, valid), v)


def int8_attention(qh, layer: Int8Layer, lengths):
    # One scale per (token, head): it multiplies the whole score / value row.
    ks, vs = layer.k_scale.astype(jnp.float32), layer.v_scale.astype(jnp.float32)
    scores = jnp.einsum("bhrd,bhtd->bhrt", qh, layer.k.astype(jnp.float32)) * ks[:, :, None, :]
    valid = (jnp.arange(layer.k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    p = _softmax(scores, valid) * vs[:, :, None, :]
    return jnp.einsum("bhrt,bhtd->bhrd", p, layer.v.astype(jnp.float32))



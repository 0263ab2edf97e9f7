"""A Flax NNX Llama that decodes on any of the project's KV caches.

Small modules (RMSNorm, Attention, MLP, Block, Llama); the transformer blocks
are one :class:`Block` whose parameters carry a leading layer axis, run with
``lax.scan`` so a 30-layer model compiles one layer body. Two pure entry
points own the cache life cycle:

* :func:`prefill` - full-precision causal attention over a (right-padded,
  ragged) prompt; returns logits and a fresh cache built from the prompt's keys
  and values (the key normalization is computed there).
* :func:`decode_step` - one token per sequence; appends to the cache and
  attends over it with ``innerq_jax.decode_attention_layer``; returns logits
  and a new cache. Jit it with the cache donated (see :func:`jit_decode_step`).

Compute is bf16 (configurable) with float32 norms, rotary and softmax.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from innerq_jax import CacheConfig, KVCache, decode_attention_layer


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    tie_embeddings: bool = True
    max_positions: int = 8192

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; allowed: default, linear, llama3"
            )

    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        """From a transformers.LlamaConfig (config.json or GGUF metadata)."""
        arch = getattr(config, "model_type", "llama")
        if arch != "llama":
            raise ValueError(f"model_type={arch!r} is not a Llama model; only 'llama' is supported")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("Llama variants with projection biases are not supported")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None) or {}
        rope = {**legacy, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            tie_embeddings=bool(config.tie_word_embeddings),
            max_positions=int(getattr(config, "max_position_embeddings", 8192)),
        )


# --------------------------------------------------------------------- rotary
def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2], with linear or Llama 3 scaling."""
    D = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        low_wl = old / cfg.rope_low_freq_factor
        high_wl = old / cfg.rope_high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (old / wl - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        scaled = np.where(wl > low_wl, inv / cfg.rope_factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        inv = np.where(mid, (1 - smooth) * inv / cfg.rope_factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """x [..., T, heads, D] at positions [..., T] (HF rotate-half convention)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[..., None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[..., None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


# -------------------------------------------------------------------- modules
def _param(rngs, shape, dtype, scale=None):
    fan_in = shape[-2] if len(shape) >= 2 else 1
    std = scale if scale is not None else 1.0 / math.sqrt(fan_in)
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, stack: tuple = (), dtype=jnp.bfloat16):
        self.weight = nnx.Param(jnp.ones(stack + (dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...]).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query attention projections (weights stored [in, out])."""

    def __init__(self, cfg: ModelConfig, rngs, stack=(), dtype=jnp.bfloat16):
        E, D = cfg.hidden_size, cfg.head_dim
        self.q = _param(rngs, stack + (E, cfg.num_heads * D), dtype)
        self.k = _param(rngs, stack + (E, cfg.num_kv_heads * D), dtype)
        self.v = _param(rngs, stack + (E, cfg.num_kv_heads * D), dtype)
        self.o = _param(rngs, stack + (cfg.num_heads * D, E), dtype)
        self.cfg = cfg

    def qkv(self, x, positions, inv_freq):
        """x [B, T, E] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] (rotary applied)."""
        c = self.cfg
        B, T, _ = x.shape
        q = (x @ self.q[...]).reshape(B, T, c.num_heads, c.head_dim)
        k = (x @ self.k[...]).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = (x @ self.v[...]).reshape(B, T, c.num_kv_heads, c.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, stack=(), dtype=jnp.bfloat16):
        E, F = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, stack + (E, F), dtype)
        self.up = _param(rngs, stack + (E, F), dtype)
        self.down = _param(rngs, stack + (F, E), dtype)

    def __call__(self, x):
        return (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Block(nnx.Module):
    """One transformer block; built with ``stack=(L,)`` it holds all L layers."""

    def __init__(self, cfg: ModelConfig, rngs, stack=(), dtype=jnp.bfloat16):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, stack, dtype)
        self.attn = Attention(cfg, rngs, stack, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, stack, dtype)
        self.mlp = MLP(cfg, rngs, stack, dtype)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None, dtype=jnp.bfloat16):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, scale=0.02)
        self.layers = Block(cfg, rngs, (cfg.num_layers,), dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, (), dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, scale=0.02)
        )
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(cfg)))

    @classmethod
    def from_checkpoint(cls, ckpt, dtype=jnp.bfloat16) -> "Llama":
        """Builds the model from a models.weights.Checkpoint (HF names, [out, in])."""
        cfg = ModelConfig.from_hf(ckpt.config)
        model = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), dtype))
        t = ckpt.tensors

        def stacked(name, transpose=True):
            ws = [t[f"model.layers.{i}.{name}.weight"] for i in range(cfg.num_layers)]
            w = np.stack([x.T if transpose else x for x in ws])
            return jnp.asarray(w, jnp.float32 if not transpose else dtype)

        lay = model.layers
        lay.attn_norm.weight = nnx.Param(stacked("input_layernorm", False))
        lay.mlp_norm.weight = nnx.Param(stacked("post_attention_layernorm", False))
        lay.attn.q = nnx.Param(stacked("self_attn.q_proj"))
        lay.attn.k = nnx.Param(stacked("self_attn.k_proj"))
        lay.attn.v = nnx.Param(stacked("self_attn.v_proj"))
        lay.attn.o = nnx.Param(stacked("self_attn.o_proj"))
        lay.mlp.gate = nnx.Param(stacked("mlp.gate_proj"))
        lay.mlp.up = nnx.Param(stacked("mlp.up_proj"))
        lay.mlp.down = nnx.Param(stacked("mlp.down_proj"))
        model.embed = nnx.Param(jnp.asarray(t["model.embed_tokens.weight"], dtype))
        model.norm.weight = nnx.Param(jnp.asarray(t["model.norm.weight"], jnp.float32))
        if not cfg.tie_embeddings:
            model.lm_head = nnx.Param(jnp.asarray(t["lm_head.weight"].T, dtype))
        model.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(cfg)))
        return model

    def logits(self, x):
        h = self.norm(x)
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...e,ev->...v", h, w, preferred_element_type=jnp.float32)


# ------------------------------------------------------------- entry points
def _scan_layers(model: Llama, body, x, xs):
    """lax.scan of body(block, x, xs_layer) -> (x, ys_layer) over the stacked layers."""
    graphdef, state = nnx.split(model.layers)

    def step(carry, inp):
        st, extra = inp
        return body(nnx.merge(graphdef, st), carry, extra)

    return jax.lax.scan(step, x, (state, xs))


def prefill(model: Llama, tokens: jax.Array, lengths: jax.Array, cache_config: CacheConfig,
            *, all_logits: bool = False):
    """Causal forward over right-padded prompts tokens [B, T] with lengths [B].

    Returns (logits, cache): logits [B, V] at each prompt's last token (or
    [B, T, V] with ``all_logits``), and a cache of capacity
    ``cache_config.capacity`` holding the prompts.
    """
    cfg = model.cfg
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
    x = model.embed[...][tokens]
    inv = model.inv_freq[...]
    r = cfg.num_heads // cfg.num_kv_heads
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & (jnp.arange(T)[None, None, :] < lengths[:, None, None])

    def body(block, x, _):
        h = block.attn_norm(x)
        q, k, v = block.attn.qkv(h, pos, inv)
        qg = q.reshape(B, T, cfg.num_kv_heads, r, cfg.head_dim)
        s = jnp.einsum("bqhrd,bkhd->bhrqk", qg, k, preferred_element_type=jnp.float32)
        s = s / math.sqrt(cfg.head_dim)
        s = jnp.where(causal[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("bhrqk,bkhd->bqhrd", p, v).reshape(B, T, -1)
        x = x + o @ block.attn.o[...]
        x = x + block.mlp(block.mlp_norm(x))
        # cache layout: [B, Hkv, T, D]
        return x, (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))

    x, (ks, vs) = _scan_layers(model, body, x, None)
    cache = KVCache.from_prefill(cache_config, ks, vs, lengths)
    if all_logits:
        return model.logits(x), cache
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def decode_step(model: Llama, cache: KVCache, tokens: jax.Array, *, backend: str = "auto"):
    """One decode step: tokens [B] at positions cache.lengths -> (logits [B, V], new cache)."""
    B = tokens.shape[0]
    pos = cache.lengths[:, None]  # [B, 1]
    x = model.embed[...][tokens][:, None, :]  # [B, 1, E]
    inv = model.inv_freq[...]
    ccfg = cache.config
    after = jnp.minimum(cache.lengths + 1, ccfg.capacity)

    def body(block, x, layer_cache):
        h = block.attn_norm(x)
        q, k, v = block.attn.qkv(h, pos, inv)  # [B, 1, heads, D]
        layer_cache = layer_cache.append(k[:, 0], v[:, 0], cache.lengths, ccfg)
        o = decode_attention_layer(q[:, 0], layer_cache, after, ccfg, backend=backend)
        x = x + o.reshape(B, 1, -1).astype(x.dtype) @ block.attn.o[...]
        x = x + block.mlp(block.mlp_norm(x))
        return x, layer_cache

    x, layers = _scan_layers(model, body, x, cache.layers)
    return model.logits(x[:, 0]), cache.with_layers(layers)


@functools.partial(jax.jit, static_argnames=("cache_config", "all_logits"))
def jit_prefill(model, tokens, lengths, cache_config: CacheConfig, all_logits: bool = False):
    return prefill(model, tokens, lengths, cache_config, all_logits=all_logits)


@functools.partial(jax.jit, static_argnames=("backend",), donate_argnums=(1,))
def jit_decode_step(model, cache, tokens, backend: str = "auto"):
    """decode_step compiled once per cache configuration, the cache donated."""
    return decode_step(model, cache, tokens, backend=backend)


def cache_for(model: Llama, cache_config: CacheConfig, batch: int) -> KVCache:
    """An empty cache shaped for this model."""
    c = model.cfg
    return KVCache.create(cache_config, c.num_layers, batch, c.num_kv_heads, c.head_dim)


__all__ = ["Llama", "ModelConfig", "decode_step", "jit_decode_step", "jit_prefill", "prefill",
           "cache_for"]

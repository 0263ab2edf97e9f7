"""A Flax NNX Llama that decodes on any of the project's KV caches.

Small modules (RMSNorm, Attention, MLP, Block, Llama), one :class:`Block` per
layer with its own parameters, and one block body for prefill and decode
(``Block.__call__``). Two pure entry points own the cache life cycle:

* :func:`prefill` - full-precision causal attention over a (right-padded,
  ragged) prompt; returns logits and a fresh cache built from the prompt's keys
  and values (the key normalization is computed there).
* :func:`decode_step` - one token per sequence; appends to the cache and
  attends over it with ``innerq_jax.decode_attention_layer``; returns logits
  and a new cache. Jit it with the cache donated (:class:`DecodeStep` for a loop
  driven from Python, or :func:`jit_decode_step`):
  the layers run as a Python loop over per-layer caches, so XLA updates every
  cache buffer in place (a ``lax.scan`` taking the cache as xs and returning it
  as ys would copy the whole cache every step).

Compute is bf16 (configurable) with float32 norms, rotary and softmax.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from innerq_jax import CacheConfig, KVCache, decode_attention_layer
from innerq_jax.cache import hadamard, layer_class, rotation_signs
from innerq_jax.config import is_int
from innerq_jax.sharding import MODEL, cache_shardings, on_mesh
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
    def __init__(self, dim: int, eps: float, dtype=jnp.bfloat16):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...]).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query attention over one layer's KV cache.

    The query, key and value projections are one weight ``qkv`` [E, Hkv, r + 2, D]
    (r = Hq / Hkv): for each kv head, its r query heads, then its key, then its value. One
    matmul per step instead of three, and one XLA will not turn into a reduction: XLA's GPU
    simplifier rewrites a vector-matrix dot whose operands total under 10M elements as a
    multiply and a reduce (a decode step at one sequence: Llama-3-8B's key and value
    projections, 4096 x 1024 each) that runs at a fifth of the bandwidth and can be fused
    into whatever reads its result. Splitting the kv-head axis keeps each head's q, k and v
    together under tensor parallelism. ``o`` is [Hq * D, E].
    """

    def __init__(self, cfg: ModelConfig, rngs, dtype=jnp.bfloat16):
        E, D, H = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads
        r = cfg.num_heads // H
        self.qkv = _param(rngs, (E, H, r + 2, D), dtype, scale=1.0 / math.sqrt(E))
        self.o = _param(rngs, (cfg.num_heads * D, E), dtype)
        self.cfg = cfg

    def project(self, x, positions, inv_freq):
        """x [B, T, E] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] (rotary applied)."""
        c = self.cfg
        B, T, _ = x.shape
        r = c.num_heads // c.num_kv_heads
        y = jnp.einsum("bte,ehjd->bthjd", x, self.qkv[...])  # one matmul, [B, T, Hkv, r + 2, D]
        q = y[..., :r, :].reshape(B, T, c.num_heads, c.head_dim)
        k, v = y[..., r, :], y[..., r + 1, :]
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    @staticmethod
    def fuse(wq, wk, wv, num_kv_heads: int, head_dim: int):
        """The ``qkv`` weight [E, Hkv, r + 2, D] from [E, Hq * D], [E, Hkv * D] x 2."""
        E = wq.shape[0]
        q = wq.reshape(E, num_kv_heads, -1, head_dim)
        k = wk.reshape(E, num_kv_heads, 1, head_dim)
        v = wv.reshape(E, num_kv_heads, 1, head_dim)
        return jnp.concatenate([q, k, v], axis=2)

    def __call__(self, x, positions, inv_freq, ctx: "CacheContext", layer_cache=None):
        """x [B, T, E] -> (out [B, T, E], this layer's cache after the call).

        Prefill (``layer_cache`` None): causal attention over the right-padded
        prompt in full precision, and the layer's cache built from its k, v.
        Decode (T = 1): the token's k, v appended to ``layer_cache`` (in place
        under donation), then decode attention over the cache.
        """
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.project(x, positions, inv_freq)
        cfg = ctx.config
        if layer_cache is None:
            r = c.num_heads // c.num_kv_heads
            qg = q.reshape(B, T, c.num_kv_heads, r, c.head_dim)
            s = jnp.einsum("bqhrd,bkhd->bhrqk", qg, k, preferred_element_type=jnp.float32)
            s = s / math.sqrt(c.head_dim)
            t = jnp.arange(T)
            causal = (t[None, :, None] >= t[None, None, :]) & (t[None, None, :] <
                                                                ctx.lengths[:, None, None])
            s = jnp.where(causal[:, None, None], s, -1e30)
            p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
            o = jnp.einsum("bhrqk,bkhd->bqhrd", p, v).reshape(B, T, -1)
            # cache layout: [B, Hkv, T, D]; each device builds its own sequences and heads
            # randomized Hadamard signs (None unless cfg.rotation_signs) of the global
            # heads, split by the mesh like the cache
            signs = rotation_signs(cfg, ctx.layer, B, c.num_kv_heads, c.head_dim)

            def build(kk, vv, n, sg):
                return layer_class(cfg).prefill(kk, vv, n, cfg, signs=sg)

            layer_cache = on_mesh(build, ctx.mesh, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                  ctx.lengths, signs)
        else:
            def step(q1, k1, v1, lay, n):
                # (a quantized layer's write kernel also zeroes the attention op's counters)
                lay, counters = lay.append_with_counters(k1, v1, n, cfg)
                after = jnp.minimum(n + 1, cfg.capacity)
                return decode_attention_layer(q1, lay, after, cfg, backend=ctx.backend,
                                              counters=counters), lay

            o, layer_cache = on_mesh(step, ctx.mesh, q[:, 0], k[:, 0], v[:, 0], layer_cache,
                                     ctx.lengths)
            o = o.reshape(B, 1, -1)
        return o.astype(x.dtype) @ self.o[...], layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype=jnp.bfloat16):
        E, F = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (E, F), dtype)
        self.up = _param(rngs, (E, F), dtype)
        self.down = _param(rngs, (F, E), dtype)

    def __call__(self, x):
        return (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Block(nnx.Module):
    """One transformer block: the same body for prefill and decode."""

    def __init__(self, cfg: ModelConfig, rngs, dtype=jnp.bfloat16):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype=dtype)
        self.attn = Attention(cfg, rngs, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype=dtype)
        self.mlp = MLP(cfg, rngs, dtype)

    def __call__(self, x, positions, inv_freq, ctx: "CacheContext", layer_cache=None):
        """x [B, T, E] -> (x, layer cache); see :meth:`Attention.__call__`."""
        o, layer_cache = self.attn(self.attn_norm(x), positions, inv_freq, ctx, layer_cache)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), layer_cache


@dataclass(frozen=True)
class CacheContext:
    """What every layer's attention needs besides its own cache."""

    lengths: jax.Array  # [B] tokens in the cache before this call (prefill: prompt lengths)
    # the config the layers are written and read with: the cache's, or for a model that folds
    # the value rotation (:func:`fold_value_rotation`) the same rotating keys only
    # (:func:`_layer_config`)
    config: CacheConfig
    backend: str = "auto"
    mesh: Mesh | None = None  # data x model mesh; attention then runs per device
    layer: int = 0  # index of the layer being built (prefill: its rotation signs)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None, dtype=jnp.bfloat16):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, scale=0.02)
        # One Block per layer, each with its own buffers: decode loops over them
        # and over the per-layer caches, so every buffer is updated where it is.
        self.layers = nnx.List([Block(cfg, rngs, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype=dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, scale=0.02)
        )
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(cfg)))
        # None, or the value rotation folded into the weights (:func:`fold_value_rotation`):
        # the rotation seed where it has signs, else -1
        self.value_fold: int | None = None

    @classmethod
    def from_checkpoint(cls, ckpt, dtype=jnp.bfloat16) -> "Llama":
        """Builds the model from a models.weights.Checkpoint (HF names, [out, in])."""
        cfg = ModelConfig.from_hf(ckpt.config)
        model = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), dtype))
        t = ckpt.tensors

        def weight(name, transpose=True):
            w = t[name]
            return jnp.asarray(w.T, dtype) if transpose else jnp.asarray(w, jnp.float32)

        for i, lay in enumerate(model.layers):
            pre = f"model.layers.{i}."
            lay.attn_norm.weight = nnx.Param(weight(pre + "input_layernorm.weight", False))
            lay.mlp_norm.weight = nnx.Param(weight(pre + "post_attention_layernorm.weight", False))
            wq, wk, wv = (weight(pre + f"self_attn.{p}_proj.weight") for p in "qkv")
            lay.attn.qkv = nnx.Param(Attention.fuse(wq, wk, wv, cfg.num_kv_heads, cfg.head_dim))
            lay.attn.o = nnx.Param(weight(pre + "self_attn.o_proj.weight"))
            for proj in ("gate", "up", "down"):
                setattr(lay.mlp, proj, nnx.Param(weight(pre + f"mlp.{proj}_proj.weight")))
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


# ------------------------------------------------------- the value rotation folded
def _fold_key(cache_config: CacheConfig) -> int:
    """What a fold depends on: the rotation's seed where it has signs, else -1."""
    return cache_config.rotation_seed if cache_config.rotation_signs else -1


def _layer_config(model: "Llama", cache_config: CacheConfig) -> CacheConfig:
    """The config a cache of ``cache_config`` has its layers written and read with by
    ``model``: ``cache_config`` itself, or for a model that folds the value rotation the
    same cache rotating keys only, after checking that ``cache_config`` rotates values with
    the signs the fold used."""
    fold = getattr(model, "value_fold", None)
    if fold is None:
        return cache_config
    if not cache_config.rotate_values or _fold_key(cache_config) != fold:
        raise ValueError(
            f"this model folds a value rotation into its weights (fold_value_rotation, "
            f"seed key {fold}), so its cache must rotate values with the same signs "
            f"(rotation='keys_values', rotation_signs / rotation_seed as folded); got "
            f"rotation={cache_config.rotation!r}, rotation_signs="
            f"{cache_config.rotation_signs}, rotation_seed={cache_config.rotation_seed}. "
            f"Use the model it was folded from for any other cache")
    return cache_config.replace(rotation="keys")


def fold_value_rotation(model: "Llama", cache_config: CacheConfig) -> "Llama":
    """A copy of ``model`` whose weights carry ``cache_config``'s value rotation.

    A cache with ``rotation='keys_values'`` stores each value as v M (M = diag(s) H per
    layer and kv head: the Hadamard H, the signs s where ``rotation_signs``) and undoes M
    on the attention's output. Attention is linear in the values, so the same model is
    W_v M in place of W_v and M^T W_o (per query head's rows) in place of W_o: the cache
    then stores the projection as it comes and the output leaves rotated, and neither
    the cache write nor the attention's finish rotates anything (one Hadamard product and
    a 16-row merge less per layer and step; the keys' rotation stays, after the rotary
    embedding). Mathematically the same model; the folded weights are rounded to the
    model's dtype once.

    The copy shares every other array with ``model`` and records the fold
    (``value_fold``): :func:`prefill` and :func:`decode_step` accept it with that cache
    config only (a ``ValueError`` otherwise), and the cache they build is an ordinary
    ``cache_config`` cache, which the unfolded model can also continue. :func:`generate
    <models.generate.generate>` and :class:`DecodeStep` fold by themselves.
    """
    if not cache_config.rotate_values:
        raise ValueError(f"fold_value_rotation needs a cache that rotates values "
                         f"(rotation='keys_values'); got rotation={cache_config.rotation!r}")
    if getattr(model, "value_fold", None) is not None:
        raise ValueError("this model already folds a value rotation; fold the model it "
                         "came from")
    c = model.cfg
    cache_config.validate_head_dim(c.head_dim)
    D, Hkv = c.head_dim, c.num_kv_heads
    r = c.num_heads // Hkv
    graphdef, state = nnx.split(model)
    folded = nnx.merge(graphdef, state)  # new modules over the same arrays
    h = jnp.asarray(hadamard(D))
    for i, lay in enumerate(folded.layers):
        signs = rotation_signs(cache_config, i, 1, Hkv, D)  # [1, Hkv, D] int8, or None
        s = jnp.ones((Hkv, D), jnp.float32) if signs is None else signs[0].astype(jnp.float32)
        m = s[:, :, None] * h[None]  # [Hkv, D, D]: diag(s) H per kv head
        qkv = lay.attn.qkv[...]
        wv = jnp.einsum("ehd,hdf->ehf", qkv[:, :, r + 1].astype(jnp.float32), m)
        lay.attn.qkv = nnx.Param(qkv.at[:, :, r + 1].set(wv.astype(qkv.dtype)))
        wo = lay.attn.o[...]
        E = wo.shape[-1]
        wo4 = wo.reshape(Hkv, r, D, E).astype(jnp.float32)  # rows: query head (kv, rep), d
        lay.attn.o = nnx.Param(jnp.einsum("hfd,hrfe->hrde", m, wo4).reshape(wo.shape)
                               .astype(wo.dtype))
    folded.value_fold = _fold_key(cache_config)
    return folded


# ------------------------------------------------------------- entry points
def prefill(model: Llama, tokens: jax.Array, lengths: jax.Array, cache_config: CacheConfig,
            *, all_logits: bool = False, mesh: Mesh | None = None):
    """Causal forward over right-padded prompts tokens [B, T] with lengths [B].

    Returns (logits, cache): logits [B, V] at each prompt's last token (or
    [B, T, V] with ``all_logits``), and a cache of capacity
    ``cache_config.capacity`` holding the prompts. With a ``mesh`` (see
    :func:`shard_model`) the cache comes out split over it.
    """
    B, T = tokens.shape
    if T > cache_config.capacity:
        raise ValueError(f"prompt of {T} tokens exceeds the cache capacity of "
                         f"{cache_config.capacity}; raise CacheConfig.capacity")
    pos = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
    x = model.embed[...][tokens]
    inv = model.inv_freq[...]
    ctx = CacheContext(jnp.asarray(lengths, jnp.int32), _layer_config(model, cache_config),
                       mesh=mesh)
    layers = []
    for i, block in enumerate(model.layers):
        x, layer_cache = block(x, pos, inv, replace(ctx, layer=i))
        layers.append(layer_cache)
    cache = _placed(KVCache.from_layers(cache_config, layers, ctx.lengths), mesh)
    if all_logits:
        return model.logits(x), cache
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


def decode_step(model: Llama, cache: KVCache, tokens: jax.Array, *, backend: str = "auto",
                mesh: Mesh | None = None):
    """One decode step: tokens [B] at positions cache.lengths -> (logits [B, V], new cache).

    A loop over layers: layer i's cache is appended to and read where it is, so
    under a donated jit nothing but the new token's rows (and a flushed group)
    is written. With a ``mesh``, each layer's append and attention run per
    device on its sequences and kv heads.
    """
    pos = cache.lengths[:, None]  # [B, 1]
    x = model.embed[...][tokens][:, None, :]  # [B, 1, E]
    inv = model.inv_freq[...]
    ctx = CacheContext(cache.lengths, _layer_config(model, cache.config), backend, mesh)
    layers = []
    for block, layer_cache in zip(model.layers, cache.layers, strict=True):
        x, layer_cache = block(x, pos, inv, ctx, layer_cache)
        layers.append(layer_cache)
    return model.logits(x[:, 0]), _placed(cache.with_layers(layers), mesh)


def _placed(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Every leaf on its mesh sharding (lengths and flags too), so prefill's cache and each
    step's have the same shardings and a compiled step takes either: one compile."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


@functools.partial(jax.jit, static_argnames=("cache_config", "all_logits", "mesh"))
def jit_prefill(model, tokens, lengths, cache_config: CacheConfig, all_logits: bool = False,
                mesh: Mesh | None = None):
    return prefill(model, tokens, lengths, cache_config, all_logits=all_logits, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("backend", "mesh"), donate_argnames=("cache",))
def jit_decode_step(model, cache, tokens, backend: str = "auto", mesh: Mesh | None = None):
    """decode_step compiled once per cache configuration and mesh, the cache donated.

    With a mesh, pass a model placed by :func:`shard_model` and a cache placed
    by ``innerq_jax.sharding.shard_cache``: the step keeps both where they are.
    Each call walks the NNX module on the host; a loop that calls it once per
    token should use :class:`DecodeStep`, which does that once.
    """
    return decode_step(model, cache, tokens, backend=backend, mesh=mesh)


class DecodeStep:
    """A model's decode step, jit-compiled with the cache donated, for a host-driven loop.

    ``step = DecodeStep(model); logits, cache = step(cache, tokens)``: the same
    computation as :func:`jit_decode_step`, without its host cost. Passing the
    NNX module to a jitted function makes every call walk the module graph in
    Python (0.8-1.5 ms for the 32-layer 8B shape on the H200 machine's host, more on
    slower hosts), and the 2-bit cache's step at B 8 / 32k is already bound by the
    host launching its kernels (``benchmarks/KERNEL_NOTES.md``, "Round 11"). Here the
    module is split once: the step holds its arrays as a flat list (a snapshot:
    rebind after changing the model's variables) and rebuilds the module inside the
    trace.

    For a cache that rotates values (``rotation='keys_values'``, the recommended cache)
    the step runs, by default (``fold_values``), on a copy of the weights with the value
    rotation folded in (:func:`fold_value_rotation`, made once per rotation at the first
    such call and kept: a second copy of each layer's ``qkv`` and ``o``): the same model
    without a Hadamard product and a 16-row merge per layer and step.

    ``lower(cache, tokens)`` gives jax's ``Lowered`` (``.compile()``, memory
    analysis); a compiled step is called as
    ``compiled(step.params_for(cache.config), cache, tokens)``. :meth:`greedy` runs
    several greedy steps in one device loop.
    """

    def __init__(self, model: Llama, *, backend: str = "auto", mesh: Mesh | None = None,
                 fold_values: bool = True):
        self.backend, self.mesh, self.fold_values = backend, mesh, bool(fold_values)
        self._graphdef, state = nnx.split(model)
        self.params, self._treedef = jax.tree.flatten(state)
        self._model_folds = getattr(model, "value_fold", None) is not None
        self._jitted, self._greedy = self._compile(self._graphdef, self._treedef)
        self._folded = {}  # fold key -> (params, jitted step, jitted greedy loop)

    def _compile(self, graphdef, treedef):
        backend, mesh = self.backend, self.mesh

        def run(params, cache, tokens):
            bound = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
            return decode_step(bound, cache, tokens, backend=backend, mesh=mesh)

        def greedy(params, cache, tokens, steps):
            def body(i, carry):
                cache, tok, out = carry
                logits, cache = run(params, cache, tok)
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                return cache, tok, out.at[:, i].set(tok)

            out = jnp.zeros((tokens.shape[0], steps), jnp.int32)
            cache, _, out = jax.lax.fori_loop(0, steps, body, (cache, tokens, out))
            return out, cache

        return (jax.jit(run, donate_argnames=("cache",)),
                jax.jit(greedy, static_argnames=("steps",), donate_argnames=("cache",)))

    def _variant(self, cache_config: CacheConfig):
        """(params, step, greedy loop) for a cache of ``cache_config``."""
        if not (self.fold_values and cache_config.rotate_values) or self._model_folds:
            # (a model folded already steps as it is: decode_step checks its cache config)
            return self.params, self._jitted, self._greedy
        key = _fold_key(cache_config)
        if key not in self._folded:
            model = nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, self.params))
            graphdef, state = nnx.split(fold_value_rotation(model, cache_config))
            params, treedef = jax.tree.flatten(state)
            # each folded weight where its original lies (a mesh's shards included)
            params = [jax.device_put(p, o.sharding) if isinstance(o, jax.Array) else p
                      for p, o in zip(params, self.params, strict=True)]
            self._folded[key] = (params, *self._compile(graphdef, treedef))
        return self._folded[key]

    def params_for(self, cache_config: CacheConfig) -> list:
        """The flat arrays a step over a ``cache_config`` cache runs on (the value rotation
        folded in where the cache rotates values and ``fold_values``)."""
        return self._variant(cache_config)[0]

    def __call__(self, cache: KVCache, tokens: jax.Array):
        """tokens [B] at positions cache.lengths -> (logits [B, V], the new cache); the
        cache passed in is donated (its buffers are reused, do not read it again)."""
        params, jitted, _ = self._variant(cache.config)
        return jitted(params, cache, tokens)

    def lower(self, cache: KVCache, tokens: jax.Array):
        params, jitted, _ = self._variant(cache.config)
        return jitted.lower(params, cache, tokens)

    def greedy(self, cache: KVCache, tokens: jax.Array, steps: int):
        """``steps`` greedy steps in one jitted loop on the device, fed ``tokens`` [B] first:
        (the chosen tokens [B, steps], the new cache); the cache passed in is donated.
        One call per ``steps`` tokens, so the host launches the loop, not each step."""
        if not is_int(steps) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an int >= 1")
        params, _, greedy = self._variant(cache.config)
        return greedy(params, cache, tokens, steps=steps)

    def lower_greedy(self, cache: KVCache, tokens: jax.Array, steps: int):
        params, _, greedy = self._variant(cache.config)
        return greedy.lower(params, cache, tokens, steps=steps)


# Megatron-style tensor parallelism on the model axis: qkv split by kv heads (each
# with its query heads), gate/up by output columns (hidden units), o and down by input rows, so each
# layer needs one all-reduce after attention and one after the MLP. The LM
# head is split by vocabulary; the embedding, norms and rotary table stay whole.
_PARAM_SPECS = {
    "qkv": P(None, MODEL, None, None), "o": P(MODEL, None),
    "gate": P(None, MODEL), "up": P(None, MODEL), "down": P(MODEL, None),
    "lm_head": P(None, MODEL),
}


def param_shardings(model: Llama, mesh: Mesh):
    """The NamedSharding of every variable of ``model`` on ``mesh``."""
    m = mesh.shape[MODEL]

    def spec(path, x):
        p = _PARAM_SPECS.get(str(path[-1]), P())
        # a dimension that does not split evenly stays whole
        if any(a is not None and x.shape[i] % m for i, a in enumerate(p)):
            p = P()
        return NamedSharding(mesh, p)

    names = lambda path: [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda path, x: spec(names(path), x),
                                            nnx.state(model))


def shard_model(model: Llama, mesh: Mesh) -> Llama:
    """Places the model's variables on ``mesh`` (in place) and returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(model, mesh)))
    return model


def cache_for(model: Llama, cache_config: CacheConfig, batch: int) -> KVCache:
    """An empty cache shaped for this model."""
    c = model.cfg
    return KVCache.create(cache_config, c.num_layers, batch, c.num_kv_heads, c.head_dim)


__all__ = ["CacheContext", "DecodeStep", "Llama", "ModelConfig", "cache_for", "decode_step",
           "fold_value_rotation", "jit_decode_step", "jit_prefill", "param_shardings", "prefill",
           "shard_model"]

"""Decode attention over the cache: the backend dispatch.

The math lives in :mod:`innerq_jax.reference` (plain jnp, the contract) and in
the kernels of :mod:`pallas_kernels`; this module only picks one per call.

Layouts beyond InnerQ and OuterQ (keys or values grouped along a non-default
axis, a key group size other than ``group_size``, fp8 scales) are read by the
fused Triton kernel (``pallas`` / ``interpret``; all but a key group of its own
with keys and values both along D, ``CacheConfig.fused_unsupported``); the TPU
and Mosaic GPU kernels read none of them (``CacheConfig.kernel_unsupported``).
Backend ``auto`` runs a configuration its device's kernel cannot read on the
reference path (correct, not fast); an explicit kernel backend raises a
``ValueError`` naming the fields. Randomized Hadamard signs work on every
backend: they are applied outside the kernel, with the rotation.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax.cache import DenseLayer, Int8Layer, KVCache, QuantLayer
from innerq_jax.config import CacheConfig, is_int
from innerq_jax.reference import (
    dense_attention,
    finish_output,
    int8_attention,
    int8_attention_fused,
    prepare_query,
    quantized_attention_core,
    split_heads,
)

Backend = Literal["auto", "reference", "pallas", "interpret", "tpu", "tpu-interpret"]
_BACKENDS = ("auto", "reference", "pallas", "interpret", "tpu", "tpu-interpret")


# ------------------------------------------------------------------ dispatch
def _check_lengths(lengths, B: int, capacity: int) -> None:
    """Shape and dtype always; values when given on the host (numpy, lists), before an
    int32 cast could wrap them (jax arrays are int32 already, and are not synced here)."""
    arr = lengths if isinstance(lengths, jax.Array) else np.asarray(lengths)
    if arr.shape != (B,) or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape [B]=({B},), got {arr.dtype}{arr.shape}")
    if isinstance(arr, np.ndarray) and (arr.min() < 0 or arr.max() > capacity):
        raise ValueError(f"lengths must lie in [0, {capacity}], got {arr.tolist()}")


def _fused_kernel():
    """The Pallas kernel, or an ImportError naming the jax it was checked with."""
    try:
        from pallas_kernels.decode import quantized_decode_attention
    except ImportError as err:
        from pallas_kernels.triton_ext import CHECKED_JAX

        raise ImportError(
            f"the Pallas kernels need jax's Pallas Triton backend, checked with jax "
            f"{CHECKED_JAX}; this jax {jax.__version__} cannot load it ({err}). Install jax "
            f"{CHECKED_JAX} or use backend='reference'") from err
    return quantized_decode_attention


@functools.cache
def _default_backend() -> str:
    return {"gpu": "pallas", "tpu": "tpu"}.get(jax.default_backend(), "reference")


def _resolve(backend: str) -> str:
    """The backend a call runs on: ``auto`` is the device's default; bad names refused."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {_BACKENDS}")
    return _default_backend() if backend == "auto" else backend


def _kernel_option_names(path: str) -> frozenset[str]:
    """The tunables the kernel of ``path`` takes (its keyword parameters but the ones the
    dispatch itself passes)."""
    import inspect

    if path == "mosaic":  # (the dispatch picks it only with these: mgpu_decode.preferred)
        from pallas_kernels.mgpu_decode import _OPTIONS

        return _OPTIONS
    if path in ("tpu", "tpu-interpret"):
        from pallas_kernels.tpu_decode import quantized_decode_attention_tpu as fn
    else:
        fn = _fused_kernel()
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params
                     if p.kind == p.KEYWORD_ONLY and p.name not in ("interpret", "prep"))


def _check_kernel_options(path: str, kernel_options) -> None:
    """Options the kernel this call runs does not take: a ValueError naming the kernel the
    dispatch chose and what it takes (the reference path takes none and ignores them)."""
    if not kernel_options or path == "reference":
        return
    allowed = _kernel_option_names(path)
    bad = sorted(set(kernel_options) - allowed)
    if bad:
        kernel = {"mosaic": "Mosaic GPU", "triton": "fused Triton",
                  "interpret": "fused Triton (interpret mode)"}.get(path, f"{path} backend's")
        raise ValueError(
            f"kernel options {bad} are not taken by the {kernel} kernel that this call runs "
            f"(the dispatch's choice for this cache, shape and device, quantized_path); it "
            f"takes {sorted(allowed)}")


def quantized_path(cfg: CacheConfig, pairs: int, backend: Backend = "auto",
                   kernel_options=(), head_dim: int | None = None) -> str:
    """The path :func:`decode_attention_layer` takes for a quantized cache with ``pairs``
    (sequence, kv head) pairs of ``head_dim`` channels: "reference", "tpu", "tpu-interpret",
    "mosaic" (the Mosaic GPU kernel, where the device's tuned entry says it measured faster
    for this layout and shape; OuterQ needs ``head_dim``),
    "triton" (the fused Triton kernel) or "interpret" (that kernel in interpret mode).

    ``auto`` runs a configuration its device's kernel cannot read on the reference path;
    an explicit kernel backend that cannot read it raises a ValueError naming the fields.
    """
    requested, backend = backend, _resolve(backend)
    chosen = requested == "auto"
    unread = {"pallas": cfg.fused_unsupported, "interpret": cfg.fused_unsupported,
              "tpu": cfg.kernel_unsupported, "tpu-interpret": cfg.kernel_unsupported,
              }.get(backend, ())
    if unread and chosen:
        return "reference"  # no kernel of this device reads this layout yet
    if unread:
        raise ValueError(
            f"backend={backend!r}: its kernel does not read {', '.join(unread)}; use "
            "backend='reference', 'auto' (which runs such configurations on the "
            "reference path) or, on a GPU, 'pallas' where the fused kernel reads them")
    if backend in ("reference", "tpu", "tpu-interpret", "interpret"):
        return backend
    from pallas_kernels.mgpu_decode import preferred

    if not cfg.kernel_unsupported and preferred(cfg, kernel_options, pairs=pairs,
                                                head_dim=head_dim):
        return "mosaic"
    return "triton"


def decode_attention_layer(
    q: jax.Array,
    layer,
    lengths: jax.Array,
    cfg: CacheConfig,
    *,
    backend: Backend = "auto",
    softmax_scale: float | None = None,
    counters: jax.Array | None = None,
    **kernel_options,
) -> jax.Array:
    """Attention of one query token per sequence over one layer's cache.

    q [B, Hq, D] (Hq a multiple of Hkv); lengths [B] = tokens in the cache,
    the current token included. Returns [B, Hq, D] in q's dtype. ``counters``: the
    done-counters ``QuantLayer.append_with_counters`` returned for this layer ([Hkv, B]
    int32 zeros, used up by the call) or None; the fused Triton kernel takes them instead
    of zeroing its own, every other path ignores them.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floating point, got {q.dtype}")
    _check_lengths(lengths, q.shape[0], cfg.capacity)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    resolved = _resolve(backend)  # a bad backend name first, whatever the layer
    if isinstance(layer, QuantLayer):
        if layer.k_scale.shape[-1] != D or layer.k_scale.shape[0] != q.shape[0]:
            raise ValueError(
                f"q shape {q.shape} does not match the cache (B={layer.k_scale.shape[0]}, "
                f"D={layer.k_scale.shape[-1]})"
            )
        path = quantized_path(cfg, q.shape[0] * layer.k_scale.shape[1], backend,
                              kernel_options, head_dim=D)
        _check_kernel_options(path, kernel_options)
        if path in ("triton", "interpret", "mosaic"):
            # the query's preparation and the output's finish run inside the kernels
            from pallas_kernels.query_prep import QueryPrep

            H = layer.k_scale.shape[1]
            q4, prep = split_heads(q, H), QueryPrep.of(q, scale)
            if path == "mosaic":
                from pallas_kernels.mgpu_decode import mgpu_decode_attention

                o = mgpu_decode_attention(q4, layer, lengths, cfg, prep=prep, **kernel_options)
            else:
                o = _fused_kernel()(q4, layer, lengths, cfg, interpret=path == "interpret",
                                    prep=prep, counters=counters, **kernel_options)
            return o.reshape(q.shape)
        qp = prepare_query(q, layer, cfg, scale)
        if path == "reference":
            o = quantized_attention_core(qp, layer, lengths, cfg)
        else:
            from pallas_kernels.tpu_decode import quantized_decode_attention_tpu

            o = quantized_decode_attention_tpu(
                qp, layer, lengths, cfg, interpret=path == "tpu-interpret", **kernel_options
            )
        return finish_output(o, cfg, q.dtype, layer.rot_signs)
    backend = resolved
    H = layer.k.shape[1]
    if layer.k.shape[0] != q.shape[0] or layer.k.shape[-1] != D:
        raise ValueError(f"q shape {q.shape} does not match the cache k shape {layer.k.shape}")
    qh = split_heads(q, H).astype(jnp.float32) * scale
    if isinstance(layer, DenseLayer) and backend in ("pallas", "interpret"):
        from pallas_kernels.dense_decode import dense_decode_attention

        o = dense_decode_attention(qh, layer.k, layer.v, lengths,
                                   interpret=backend == "interpret", **kernel_options)
    elif isinstance(layer, DenseLayer):
        # on a TPU: the bf16 einsum with f32 accumulation a user would run there
        q_in = qh.astype(layer.k.dtype) if backend.startswith("tpu") else qh
        o = dense_attention(q_in, layer.k, layer.v, lengths)
    elif isinstance(layer, Int8Layer) and backend in ("pallas", "tpu"):
        o = int8_attention_fused(qh, layer, lengths)
    elif isinstance(layer, Int8Layer):
        o = int8_attention(qh, layer, lengths)
    else:
        raise TypeError(f"unknown cache layer type {type(layer).__name__}")
    B, _, r, _ = o.shape
    return o.reshape(B, H * r, D).astype(q.dtype)


def decode_attention(q: jax.Array, cache: KVCache, layer: int = 0, *,
                     backend: Backend = "auto", softmax_scale: float | None = None,
                     **kernel_options) -> jax.Array:
    """Decode attention of q [B, Hq, D] over layer ``layer`` of ``cache``."""
    if not is_int(layer) or not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer={layer!r} must be an int in [0, {cache.num_layers})")
    return decode_attention_layer(
        q, cache.layer(layer), cache.lengths, cache.config, backend=backend,
        softmax_scale=softmax_scale, **kernel_options,
    )

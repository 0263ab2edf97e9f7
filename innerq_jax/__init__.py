"""innerq-jax: 2-bit inner-grouped KV-cache quantization for JAX.

Quick start::

    from innerq_jax import CacheConfig, KVCache, decode_attention
    cfg = CacheConfig.innerq(capacity=4096)
    cache = KVCache.from_prefill(cfg, k, v, lengths)   # k, v [L, B, Hkv, T, D]
    cache = cache.append(k_new, v_new)                 # [L, B, Hkv, D]
    out = decode_attention(q, cache, layer=0)          # q [B, Hq, D]
"""

from innerq_jax.attention import decode_attention, decode_attention_layer
from innerq_jax.cache import KVCache, check_capacity
from innerq_jax.config import CacheConfig

__all__ = ["CacheConfig", "KVCache", "check_capacity", "decode_attention",
           "decode_attention_layer"]

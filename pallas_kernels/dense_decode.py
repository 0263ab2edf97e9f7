"""bf16 decode attention over the dense cache: jax's own Pallas GPU decode kernel.

The bf16 baseline must run what a JAX user would otherwise run on the device,
so end-to-end comparisons are fair: on a GPU that is jax's Pallas
flash-decoding kernel (``jax.experimental.pallas.ops.gpu.decode_attention``),
which reads the cache in bf16 with float32 accumulation and skips the blocks
past each sequence's length. Its unbatched form is mapped over batch and kv
heads, so the cache is read in the project's [B, Hkv, C, D] layout with no
transpose.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp


@functools.cache
def _decode_module():
    # The module warns that jax's Triton-backed ops are deprecated; that is
    # jax's notice about its own kernel, not something a caller can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention
    return decode_attention


def default_k_splits(capacity: int, block_k: int = 256) -> int | None:
    """The largest split count in {16, 8, 4, 2, 1} the kernel accepts for this capacity."""
    for ks in (16, 8, 4, 2, 1):
        split = capacity // ks
        if capacity % ks == 0 and split >= 16 and split % min(block_k, split) == 0:
            return ks
    return None


def dense_decode_attention(qh: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                           k_splits: int | None = None, block_k: int = 256,
                           interpret: bool = False) -> jax.Array:
    """qh [B, H, r, D] (softmax scale folded in), k, v [B, H, C, D] bf16 -> f32 [B, H, r, D].

    ``lengths`` [B] are the live tokens per sequence.
    """
    B, H, r, D = qh.shape
    C = k.shape[2]
    ks = default_k_splits(C, block_k) if k_splits is None else k_splits
    if ks is None or C % ks or (C // ks) % min(block_k, C // ks):
        raise ValueError(f"capacity {C} cannot be split into k_splits={ks} blocks of "
                         f"block_k={block_k}")
    with warnings.catch_warnings():
        # jax's Triton-backend deprecation notice, raised while lowering its own kernel
        warnings.simplefilter("ignore", DeprecationWarning)
        inner = functools.partial(
            _decode_module().decode_attn_unbatched, start_idx=None, sm_scale=1.0, block_h=16,
            block_k=block_k, k_splits=ks, num_warps=None, num_stages=2, grid=None,
            interpret=interpret, debug=False, return_residuals=False, normalize_output=True)
        per_head = jax.vmap(lambda qq, kk, vv, n: inner(qq, kk, vv, kv_seq_len=n),
                            in_axes=(0, 0, 0, None))
        o = jax.vmap(per_head)(qh.astype(k.dtype), k, v, jnp.asarray(lengths, jnp.int32))
    return o.astype(jnp.float32)

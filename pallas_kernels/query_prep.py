"""The query's preparation and the output's finish inside the Triton kernels.

Before a kernel reads the quantized cache, the model's query becomes
``q' = (q * s) @ H * sigma * softmax_scale`` (``innerq_jax.reference.prepare_query``:
randomized Hadamard signs s and the rotation H where the cache rotates its keys,
the keys' per-channel normalisation sigma) and after it, the output goes back to
the model's space, ``o @ H * s`` where the values are rotated, in the query's
dtype (``finish_output``). In XLA these are two to four small launches per call,
about as long as the whole fused kernel at short contexts (H200, B 1 / 4k:
0.046 ms through the dispatch against 0.031 for the kernel,
benchmarks/KERNEL_NOTES.md, round 9). Here they are a few instructions of the
kernels: sigma and the scale where q is gathered (fused Triton kernel) or in the
Mosaic op's query kernel, the value rotation and the cast in the merging program
(Triton) or the epilogue's cast (Mosaic). The query's rotation runs in the Mosaic
op's query kernel, once per (sequence, kv head); for the fused Triton kernel it
stays XLA's by default, as in every program's prologue it measured slower at
B 8 / 4k (round 10; ``rotate_query="kernel"`` keeps it there).

The rotation is a tensor-core dot with the Sylvester-Hadamard matrix's signs
(``H * sqrt(D)``, +-1, exact in bf16), the f32 operand split into bf16 pieces
that sum back to it exactly (one piece for a bf16 query, three for float32), so
the product keeps float32 accuracy; 1/sqrt(D) is applied after, in float32.
Rows are padded to 16 (the MMA's smallest M).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

from innerq_jax.cache import QuantLayer, hadamard
from innerq_jax.config import CacheConfig
from innerq_jax.reference import finish_output, prepare_query
from pallas_kernels.triton_ext import dot_acc

MMA_ROWS = 16  # the smallest M of a tensor-core dot


@dataclasses.dataclass(frozen=True)
class QueryPrep:
    """What a kernel does to the model's query heads and to its output (static).

    ``softmax_scale``: the attention's scale (1/sqrt(D) by default in the dispatch);
    ``out_dtype``: the output's dtype (the query's); the rotations and signs follow
    from the cache configuration and the layer (``CacheConfig.rotate_keys`` /
    ``rotate_values``, ``QuantLayer.rot_signs``).
    """

    softmax_scale: float
    out_dtype: str = "float32"

    def __post_init__(self):
        scale = self.softmax_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not (
                math.isfinite(scale) and scale > 0):
            raise ValueError(f"softmax_scale={scale!r} must be a finite positive number")
        object.__setattr__(self, "softmax_scale", float(scale))
        dt = jnp.dtype(self.out_dtype)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"out_dtype={self.out_dtype!r} must be a floating dtype")
        object.__setattr__(self, "out_dtype", dt.name)

    @classmethod
    def of(cls, q: jax.Array, softmax_scale: float) -> "QueryPrep":
        """The preparation for the model's query ``q`` (output in its dtype)."""
        return cls(softmax_scale, jnp.dtype(q.dtype).name)


def check_query(q4: jax.Array, layer: QuantLayer) -> None:
    """q4 must be the layer's [B, H, r, D] query heads, floating point."""
    B, H, D = layer.k_scale.shape
    if q4.ndim != 4 or q4.shape[:2] != (B, H) or q4.shape[3] != D:
        raise ValueError(f"query heads {q4.shape} do not match the cache [B, H, r, D] = "
                         f"[{B}, {H}, r, {D}]")
    if not jnp.issubdtype(q4.dtype, jnp.floating):
        raise ValueError(f"the query must be floating point, got {q4.dtype}")


def prepare_xla(q4: jax.Array, layer: QuantLayer, cfg: CacheConfig, prep: QueryPrep):
    """q' [B, H, r, D] f32 in XLA (the reference's ``prepare_query``)."""
    B, H, r, D = q4.shape
    return prepare_query(q4.reshape(B, H * r, D), layer, cfg, prep.softmax_scale)


def finish_xla(o: jax.Array, layer: QuantLayer, cfg: CacheConfig, prep: QueryPrep):
    """o [B, H, r, D] f32 -> the model's space, [B, H, r, D] in ``prep.out_dtype`` (the
    reference's ``finish_output``)."""
    B, H, r, D = o.shape
    out = finish_output(o, cfg, jnp.dtype(prep.out_dtype), layer.rot_signs)
    return out.reshape(B, H, r, D)


@functools.lru_cache(maxsize=8)
def hadamard_signs(D: int) -> np.ndarray:
    """H * sqrt(D) as bf16 [D, D] (+-1, exact): the rotation's operand in the kernels."""
    return np.asarray(np.rint(hadamard(D) * np.sqrt(D)), dtype=jnp.bfloat16)


def side_operands(layer: QuantLayer, cfg: CacheConfig, prep: QueryPrep | None):
    """The per-(sequence, kv head) operands of the preparation: (sigma [B, H, D] f32, signs
    [B, H, D] (sigma again, never read, where the layer has none), H's signs [D, D] bf16 (a
    16 x 16 stand-in, never read, where nothing is rotated or ``prep`` is None))."""
    D = layer.k_scale.shape[-1]
    signs = layer.rot_signs if layer.rot_signs is not None else layer.k_scale
    needs_h = prep is not None and (cfg.rotate_keys or cfg.rotate_values)
    h = jnp.asarray(hadamard_signs(D)) if needs_h else jnp.ones((16, 16), jnp.bfloat16)
    sigma = layer.k_scale
    return (sigma if sigma.dtype == jnp.float32 else sigma.astype(jnp.float32)), signs, h


def _bf16_pieces(x: jax.Array, n: int) -> list[jax.Array]:
    """x (f32) as n bf16 pieces whose float32 sum is x (n = 3 is exact for float32)."""
    out = []
    for _ in range(n):
        p = x.astype(jnp.bfloat16)
        out.append(p)
        x = x - p.astype(jnp.float32)
    return out


def rotate_rows(x: jax.Array, h_ref, pieces: int) -> jax.Array:
    """x [M, D] f32 (M >= 16) times H (orthonormal), float32 accurate."""
    D = x.shape[-1]
    rr = jax.lax.broadcasted_iota(jnp.int32, (D, D), 0)
    cc = jax.lax.broadcasted_iota(jnp.int32, (D, D), 1)
    h = plgpu.load(h_ref.at[rr, cc])
    acc = jnp.zeros(x.shape, jnp.float32)
    for p in _bf16_pieces(x, pieces):
        acc = dot_acc(acc, p, h)
    return acc * (1.0 / math.sqrt(D))


def _vector(ref, D):
    return plgpu.load(ref.at[jax.lax.broadcasted_iota(jnp.int32, (D,), 0)]).astype(jnp.float32)


def store_prepared(q_ref, ks_ref, sg_ref, h_ref, qs_ref, *, prep: QueryPrep | None,
                   cfg: CacheConfig, signs: bool):
    """q_ref [r, D] (the model's dtype) -> q' stored in qs_ref [r, D] f32.

    ks_ref [D] f32 (sigma), sg_ref [D] (the layer's signs, read where ``signs``), h_ref
    [D, D] bf16 (:func:`hadamard_signs`, read where the keys are rotated). ``prep`` None:
    q_ref holds q' already (stored as it is).
    """
    r, D = q_ref.shape
    M = max(MMA_ROWS, 1 << (r - 1).bit_length())
    rows = jax.lax.broadcasted_iota(jnp.int32, (M, D), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (M, D), 1)
    q = plgpu.load(q_ref.at[jnp.minimum(rows, r - 1), cols], mask=rows < r, other=0)
    q = q.astype(jnp.float32)
    if prep is None:
        plgpu.store(qs_ref.at[rows, cols], q, mask=rows < r)
        return
    if cfg.rotate_keys:
        if signs:
            q = q * _vector(sg_ref, D)[None, :]
        q = rotate_rows(q, h_ref, 1 if q_ref.dtype == jnp.bfloat16 else 3)
    q = q * (_vector(ks_ref, D) * prep.softmax_scale)[None, :]
    plgpu.store(qs_ref.at[rows, cols], q, mask=rows < r)


def arrive(cnt_ref, idx, *, interpret: bool) -> jax.Array:
    """Counts this program done on ``cnt_ref[idx]`` (int32, zero at launch) once every thread's
    stores are issued; returns the count before it, so the program that reads the number of
    its peers is the last to arrive and may read their stores (volatile loads: past L1,
    which is not coherent across SMs) and finish the output."""
    if not interpret:  # (interpret mode runs programs one at a time)
        plgpu.debug_barrier()  # every thread's stores precede the (release) atomic
    return plgpu.atomic_add(cnt_ref, idx, jnp.ones((), jnp.int32))


def store_finished(out: jax.Array, o_ref, sg_ref, h_ref, *, cfg: CacheConfig, signs: bool):
    """out [M, D] f32 (the kernel's output rows, M >= r) -> o_ref [r, D] in its dtype, the
    value rotation undone where the cache rotates values (M >= 16 then)."""
    M, D = out.shape
    if cfg.rotate_values:
        out = rotate_rows(out, h_ref, 3)
        if signs:
            out = out * _vector(sg_ref, D)[None, :]
    rows = jax.lax.broadcasted_iota(jnp.int32, (M, D), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (M, D), 1)
    plgpu.store(o_ref.at[rows, cols], out.astype(o_ref.dtype), mask=rows < o_ref.shape[0])


__all__ = ["MMA_ROWS", "QueryPrep", "arrive", "check_query", "finish_xla", "hadamard_signs",
           "prepare_xla", "rotate_rows", "side_operands", "store_finished", "store_prepared"]

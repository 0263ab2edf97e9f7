"""A decode step's cache writes in one kernel (Pallas, Triton backend on GPUs).

Appending a token to a quantized layer writes a handful of small row blocks: the
token's key and value into the sink or the recent ring, and, where a sequence
flushes, one group's codes, scales, zero-points and mask into the quantized
region. As XLA scatters these are twelve launches per layer, each moving a few
hundred bytes; at small batch and on several GPUs a decode step is bound by such
launches, not by bytes. This kernel does every write of a layer in one launch,
in place (each destination is aliased to its output, so under a donated jit no
buffer is copied).

A write is ``(dst [B, H, N, C], src [B, H, n, C], start [B], enabled [B])``:
``dst[b, :, start[b] : start[b] + n] = src[b]`` where ``enabled[b]``. A block
that would not fit (``start < 0`` or ``start + n > N``) is not written at all, so
nothing lands out of bounds. The Triton backend needs power-of-two ``n`` and
``C``; :func:`kernel_can_write` says whether a write qualifies, and the caller
keeps the others on XLA's scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Write = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # dst, src, start, enabled


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_can_write(dst: jax.Array, src: jax.Array) -> bool:
    """Whether the kernel takes this write: 4-d, same B/H/C, power-of-two block."""
    return (dst.ndim == 4 and src.ndim == 4 and dst.shape[:2] == src.shape[:2]
            and dst.shape[3] == src.shape[3] and dst.shape[2] >= src.shape[2]
            and _pow2(src.shape[2]) and _pow2(src.shape[3]) and dst.dtype.itemsize <= 4)


def _as_stored(x: jax.Array) -> jax.Array:
    # fp8 travels as its bits (a free bitcast): Triton's fp8 support is partial
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x


def _kernel(starts_ref, *refs, rows: tuple[tuple[int, int], ...]):
    """starts_ref [B, nw] int32 (-1: no write); refs: nw sources [B, H, n_i, C_i], nw
    destinations (aliased to the outputs), nw outputs [B, H, N_i, C_i]."""
    nw = len(rows)
    srcs, outs = refs[:nw], refs[2 * nw:]
    b, h = pl.program_id(0), pl.program_id(1)
    for i, (n, N) in enumerate(rows):
        start = starts_ref[b, i]

        @pl.when((start >= 0) & (start <= N - n))
        def _write(i=i, n=n, start=start):
            outs[i][b, h, pl.ds(start, n), :] = srcs[i][b, h, :, :]


@functools.lru_cache(maxsize=None)
def _build_call(B: int, H: int, rows, shapes, interpret: bool):
    out_shape = tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)
    nw = len(rows)
    aliases = {1 + nw + i: i for i in range(nw)}  # inputs: starts, sources, destinations
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=1, num_stages=1)
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows),
        out_shape=out_shape,
        grid=(B, H),
        input_output_aliases=aliases,
        interpret=interpret,
        name="innerq_cache_write",
        **kw,
    )


def write_rows(writes: Sequence[Write], *, interpret: bool = False) -> list[jax.Array]:
    """Every write of ``writes`` in one kernel; returns the new destinations in order.

    Each write must satisfy :func:`kernel_can_write` (a ``ValueError`` says which
    does not); all share B and H.
    """
    if not writes:
        return []
    B, H = writes[0][0].shape[:2]
    for i, (dst, src, start, enabled) in enumerate(writes):
        if not kernel_can_write(dst, src) or dst.shape[:2] != (B, H):
            raise ValueError(
                f"write_rows: write {i} (dst {dst.shape} {dst.dtype}, src {src.shape}) does not "
                f"fit the kernel; it needs 4-d arrays of one [B, H] = [{B}, {H}], equal last "
                "dimensions, power-of-two block rows and columns, and items of at most 4 bytes")
        if start.shape != (B,) or enabled.shape != (B,):
            raise ValueError(f"write_rows: write {i} has start {start.shape} / enabled "
                             f"{enabled.shape}; both must be [B] = [{B}]")
    starts = jnp.stack([jnp.where(en, st.astype(jnp.int32), -1)
                        for _, _, st, en in writes], axis=1)
    dsts = [_as_stored(d) for d, _, _, _ in writes]
    srcs = [_as_stored(s.astype(d.dtype)) for d, s, _, _ in writes]
    rows = tuple((s.shape[2], d.shape[2]) for d, s in zip(dsts, srcs))
    shapes = tuple((d.shape, d.dtype) for d in dsts)
    call = _build_call(B, H, rows, shapes, interpret)
    out = call(starts, *srcs, *dsts)
    return [o if o.dtype == d.dtype else jax.lax.bitcast_convert_type(o, d.dtype)
            for o, (d, _, _, _) in zip(out, writes)]

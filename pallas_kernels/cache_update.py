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

A decode step also quantizes the ring's oldest group of G tokens (the group a
sequence flushes when its window is full) on every step. Given a
:class:`GroupWrite`, the same launch does that too: each program reads its
(sequence, head)'s G ring rows, puts the new token in its row, quantizes them
with :func:`innerq_jax.layout.quantize_tokens` (the jnp code of the XLA path,
traced into the kernel) and writes codes, scales, zero-points and mask where the
sequence flushes. With keys and values both quantized here an append is one
launch per layer instead of seventeen. The quantization's bf16 path is exact by
comparisons (``innerq_jax/quant.py``), so the kernel's approximate float32
division does not change a code or a scale; only the hybrid choice, which
compares two sums of squared errors, can differ from XLA's where the two sums
are equal to rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from innerq_jax.config import CacheConfig
from innerq_jax.layout import (
    ARRAY_FIELDS,
    QuantizedTensor,
    quantize_tokens,
    rows_per_token,
    tensor_params,
)

Write = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # dst, src, start, enabled


GROUP_WARPS = 8  # warps of a program that quantizes a group (1 for writes only)


def _group_warps() -> int:
    """GROUP_WARPS, or the environment's ``INNERQ_GROUP_WARPS`` (a power of two, 1-32)."""
    env = os.environ.get("INNERQ_GROUP_WARPS", "")
    if not env:
        return GROUP_WARPS
    if not env.isdigit() or int(env) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"INNERQ_GROUP_WARPS={env!r}; allowed: 1, 2, 4, 8, 16 or 32")
    return int(env)


class GroupWrite(NamedTuple):
    """A flush group quantized in the kernel: ring rows ``slot[b] .. slot[b] + G`` with
    the token in row ``own[b]`` (-1: none), written as tokens ``start[b] ..`` of ``dst``
    where ``enabled[b]``. ``ring`` is the index, in the kernel's writes, of the write
    that puts the token into the ring: its destination is the ring [B, H, W, D] and its
    source the token [B, H, 1, D]."""

    ring: int
    slot: jax.Array  # [B] int32, a multiple of G
    own: jax.Array  # [B] int32
    dst: QuantizedTensor  # [B, H, T, ...] fields
    start: jax.Array  # [B] int32, a multiple of G
    enabled: jax.Array  # [B] bool
    cfg: CacheConfig
    which: str  # "k" or "v": whose group size and scale dtype (layout.tensor_params)


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


def kernel_can_quantize(ring: jax.Array, dst: QuantizedTensor, cfg: CacheConfig,
                        which: str) -> bool:
    """Whether the kernel quantizes this tensor's flush group itself: bf16 scales (the
    exact path of ``quant.py``), power-of-two group, head dimension and field blocks."""
    G = cfg.group_size
    _, sdt = tensor_params(cfg, which)
    if jnp.dtype(sdt) != jnp.dtype(jnp.bfloat16) or ring.ndim != 4:
        return False
    if not (_pow2(G) and _pow2(ring.shape[3]) and ring.shape[2] >= G):
        return False
    for f in ARRAY_FIELDS:
        num, den = rows_per_token(dst, f)
        arr = getattr(dst, f)
        block = jax.ShapeDtypeStruct(arr.shape[:2] + (G * num // den,) + arr.shape[3:],
                                     arr.dtype)
        if (G * num) % den or not kernel_can_write(arr, block):
            return False
    return True


def _group_fields(spec) -> tuple[tuple[int, int, int, int], ...]:
    """Per field of a group's tensor: (rows written, rows of the array, num, den)."""
    G = spec.cfg.group_size
    out = []
    for f in ARRAY_FIELDS:
        num, den = rows_per_token(spec.dst, f)
        out.append((G * num // den, getattr(spec.dst, f).shape[2], num, den))
    return tuple(out)


def _kernel(table_ref, *refs, rows: tuple[tuple[int, int], ...], groups: tuple,
            counters: bool):
    """table_ref [B, nw + 3 ng] int32: per write its start (-1: no write), per group its
    ring slot, the token's row in it (-1: none) and its token start (-1: no write);
    refs: nw sources [B, H, n_i, C_i], nw + 4 ng destinations (aliased to the outputs),
    the same nw + 4 ng outputs [B, H, N_i, C_i] (a group's four: codes, scale, zero,
    mask), then with ``counters`` an output [H, B] int32 that every (b, h) zeroes (the
    fused attention kernel's done-counters, :func:`write_rows`)."""
    nw = len(rows)
    nd = nw + len(ARRAY_FIELDS) * len(groups)
    srcs, outs = refs[:nw], refs[nw + nd:]
    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if counters:
        cnt_ref = outs[nd]

        @pl.when(p == 0)
        def _zero():
            cnt_ref[h, b] = jnp.zeros((), jnp.int32)
    # Program p of a (sequence, head) quantizes group p (p = 0 without groups) and does
    # the writes into its ring; program 0 the other writes. A group reads its ring rows
    # before its program writes the token there; the token's own row is replaced by the
    # token anyway, so no order of these accesses can change what is written.
    for g, (ring, G, W, cfg, which, grouping, packing, fields) in enumerate(groups):
        pl.when(p == g)(functools.partial(
            _quantize_group, table_ref, srcs, outs, b, h, nw + 3 * g,
            nw + len(ARRAY_FIELDS) * g, ring, G, W, cfg, which, grouping, packing, fields))
    owner = {spec[0]: g for g, spec in enumerate(groups)}  # ring write -> its program
    for i, (n, N) in enumerate(rows):
        start = table_ref[b, i]

        @pl.when((p == owner.get(i, 0)) & (start >= 0) & (start <= N - n))
        def _write(i=i, n=n, start=start):
            outs[i][b, h, pl.ds(start, n), :] = srcs[i][b, h, :, :]


def _quantize_group(table_ref, srcs, outs, b, h, col, first_out, ring, G, W, cfg, which,
                    grouping, packing, fields):
    """One program's flush group: read, put the token in, quantize, write the fields.

    Only where the sequence flushes (its start >= 0): a sequence flushes once every G
    steps, and the quantization (two candidate layouts, their errors compared) is most
    of the launch's time at short contexts, so the other steps skip it."""
    start = table_ref[b, col + 2]

    @pl.when(start >= 0)
    def _flush():
        slot = jnp.minimum(table_ref[b, col], W - G)
        own = table_ref[b, col + 1]
        block = outs[ring][b, h, pl.ds(slot, G), :]  # [G, D]
        token = srcs[ring][b, h, :, :]  # [1, D]
        row = jax.lax.broadcasted_iota(jnp.int32, (G, 1), 0)
        x = jnp.where(row == own, token, block).astype(jnp.float32)
        qt = quantize_tokens(x, grouping, cfg, packing=packing, which=which)
        for f, (n, N, num, den) in zip(ARRAY_FIELDS, fields):
            out = outs[first_out + ARRAY_FIELDS.index(f)]
            r0 = start * num // den

            @pl.when(r0 <= N - n)
            def _write(out=out, r0=r0, n=n, val=getattr(qt, f)):
                out[b, h, pl.ds(r0, n), :] = val.astype(out.dtype)


@functools.lru_cache(maxsize=None)
def _build_call(B: int, H: int, rows, groups, shapes, interpret: bool, num_warps: int,
                counters: bool):
    out_shape = tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)
    if counters:
        out_shape += (jax.ShapeDtypeStruct((H, B), jnp.int32),)
    nw, nd = len(rows), len(shapes)
    aliases = {1 + nw + i: i for i in range(nd)}  # inputs: table, sources, destinations
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows, groups=groups, counters=counters),
        out_shape=out_shape,
        grid=(B, H, max(1, len(groups))),
        input_output_aliases=aliases,
        interpret=interpret,
        name="innerq_cache_write",
        **kw,
    )


def write_rows(writes: Sequence[Write], groups: Sequence[GroupWrite] = (), *,
               interpret: bool = False, num_warps: int | None = None,
               counters: bool = False) -> list[jax.Array]:
    """Every write of ``writes`` and every group of ``groups`` in one kernel; returns
    the new destinations of the writes in order, then each group's new tensor, then with
    ``counters`` a fresh [H, B] int32 array of zeros written by the same launch: the fused
    attention kernel's done-counters (:func:`pallas_kernels.decode.quantized_decode_attention`'s
    ``counters``), which otherwise cost that op a memset launch of their own per call.

    Each write must satisfy :func:`kernel_can_write` and each group
    :func:`kernel_can_quantize` (a ``ValueError`` says which does not); all share B
    and H.
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
    cols = [jnp.where(en, st.astype(jnp.int32), -1) for _, _, st, en in writes]
    static = []
    for g, spec in enumerate(groups):
        if not 0 <= spec.ring < len(writes):
            raise ValueError(f"write_rows: group {g} names ring write {spec.ring}; there are "
                             f"{len(writes)} writes")
        ring, token = writes[spec.ring][0], writes[spec.ring][1]
        if (not kernel_can_quantize(ring, spec.dst, spec.cfg, spec.which)
                or token.shape != ring.shape[:2] + (1, ring.shape[3])
                or spec.dst.codes.shape[:2] != (B, H)):
            raise ValueError(
                f"write_rows: group {g} (ring {ring.shape} {ring.dtype}, token {token.shape}, "
                f"{spec.which!r} of {spec.cfg.short_name()}) does not fit the kernel; it needs "
                "bf16 scales, a power-of-two group, head dimension and field blocks, and a "
                "[B, H, 1, D] token")
        for name in ("slot", "own", "start", "enabled"):
            if getattr(spec, name).shape != (B,):
                raise ValueError(f"write_rows: group {g} has {name} "
                                 f"{getattr(spec, name).shape}; it must be [B] = [{B}]")
        cols += [spec.slot.astype(jnp.int32), spec.own.astype(jnp.int32),
                 jnp.where(spec.enabled, spec.start.astype(jnp.int32), -1)]
        static.append((spec.ring, spec.cfg.group_size, ring.shape[2], spec.cfg, spec.which,
                       spec.dst.grouping, spec.dst.packing, _group_fields(spec)))
    table = jnp.stack(cols, axis=1)
    dsts = [_as_stored(d) for d, _, _, _ in writes]
    dsts += [getattr(spec.dst, f) for spec in groups for f in ARRAY_FIELDS]
    srcs = [_as_stored(s.astype(d.dtype)) for d, s, _, _ in writes]
    rows = tuple((s.shape[2], d.shape[2]) for d, s in zip(dsts, srcs))
    shapes = tuple((d.shape, d.dtype) for d in dsts)
    if num_warps is None:  # INNERQ_GROUP_WARPS overrides the tuned count (read when traced)
        num_warps = _group_warps() if groups else 1
    call = _build_call(B, H, rows, tuple(static), shapes, interpret, num_warps, counters)
    out = call(table, *srcs, *dsts)
    done = [o if o.dtype == d.dtype else jax.lax.bitcast_convert_type(o, d.dtype)
            for o, (d, _, _, _) in zip(out, writes)]
    rest = iter(out[len(writes):])
    for spec in groups:
        done.append(dataclasses.replace(spec.dst, **{f: next(rest) for f in ARRAY_FIELDS}))
    return done + list(rest)  # (the counters, where asked for)

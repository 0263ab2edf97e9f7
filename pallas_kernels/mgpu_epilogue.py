"""The Mosaic GPU op's epilogue in one launch: the bf16 windows and the merge of the splits.

The Mosaic GPU kernel (:mod:`pallas_kernels.mgpu_decode`) leaves one partial
(unnormalised output, running max, sum) per split of the quantized region, in its
accumulators' order (value M-rows by channel, columns by head and token group,
:class:`pallas_kernels.mgpu_geometry.Geometry`). Done in XLA, attending over the
sink and recent windows and merging the partials is about fifteen small launches
per call, each costing the op more than its own run time at short contexts
(benchmarks/KERNEL_NOTES.md, round 6). This Triton Pallas kernel does all of it in
one launch, grid (kv head, sequence, channel block):

* the windows' online softmax (:func:`pallas_kernels.window_blocks.window_part`,
  the code of the fused Triton kernel's window program; each channel block's
  program computes the scores again and only its channels' values);
* the merge: o = sum_s w_s o_s / sum_s w_s l_s with w_s = 2**(m_s - max m) over
  the splits and the windows, in the partials' own order: a program's block of
  channels is one contiguous [channels, columns] tile of each split (the M-rows
  of those channels), weighted column by column, up to 16 splits' tiles in flight
  per step; each head's columns are summed once at the end and the rows stored at
  their channels (round 15: 12.6 us at B 1 / 128k, 49 splits, against 24.9 with
  per-head gathers). Channel blocks spread the partials' reads over about two
  programs per SM: with one program per (sequence, kv head), B 1 / 128k read 49
  splits' partials through 8 SMs (about 0.1 ms, round 8).

:func:`windows_and_merge` does both (``windows="epilogue"``); :func:`merge_partials`
only merges, for ``windows="kernel"``, whose window program leaves the windows' partial
as one more split.

Zero where a sequence holds nothing; a NaN partial (a non-finite key or value)
reaches its heads' outputs, as in the reference. It runs in Pallas interpret mode
on the CPU (tests/test_mgpu_kernels.py checks it there against the XLA merge).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import region_sizes
from pallas_kernels import query_prep as qprep
from pallas_kernels import window_blocks as wb
from pallas_kernels.innerq_blocks import next_pow2
from pallas_kernels.device_info import sm_count
from pallas_kernels.mgpu_geometry import NEG, Geometry
from pallas_kernels.triton_ext import call_quietly

_SPLIT_STEP = 16  # splits per gather of the running maxima and sums
_MERGE_STEP = 16  # at most this many splits' partials read per merge step (loads overlap)
_MERGE_ELEMS = 4096  # and at most this many f32 per step (32 per thread at 4 warps)
_MIN_CHANNELS = 16  # smallest channel block (Triton tiles are at least 16 wide)


def _epilogue_kernel(
    q_ref,  # [r, D] f32: this (sequence, kv head)'s queries (sigma, rotation, scale folded in)
    len_ref,  # [B] int32: tokens in each sequence
    sk_ref,  # [S, D] bf16: the sink window (the ring again, never read, when S = 0)
    sv_ref,  # [S, D] bf16
    rk_ref,  # [W, D] bf16: the recent ring
    rv_ref,  # [W, D] bf16
    op_ref,  # [NS, D, NV] f32: the Mosaic kernel's partial outputs (M-row, column order)
    ml_ref,  # [NS, 2, NV] f32: its running maxima (row 0) and sums (row 1), column order
    o_ref,  # [r, D] f32 (or the query's dtype): the output
    *, geo: Geometry, cfg: CacheConfig, DC: int,
):
    """Windows and merge: the windows' partial, then every split's, merged."""
    b, d0 = pl.program_id(1), pl.program_id(2) * DC  # this program's channels d0 .. d0 + DC
    window = _window_partial(q_ref, len_ref[b], sk_ref, sv_ref, rk_ref, rv_ref, op_ref.shape[1],
                             d0, geo=geo, cfg=cfg, DC=DC)
    _merge(op_ref, ml_ref, o_ref, window, d0, geo=geo, DC=DC)


def _window_partial(q_ref, length, sk_ref, sv_ref, rk_ref, rv_ref, D, d0, *, geo: Geometry,
                    cfg: CacheConfig, DC: int):
    """The windows' partial (o [NH, DC], m [NH], l [NH]) of a sequence of ``length`` tokens,
    its output columns those of M-rows d0 .. d0 + DC in the partials' order."""
    sizes = region_sizes(length, cfg)
    windows = wb.cache_windows(sk_ref, sv_ref, rk_ref, rv_ref, sizes, cfg)
    return wb.window_part(q_ref, windows, D, v_cols=(d0, DC), v_order=geo.v_channel)


def _finishing_epilogue_kernel(
    q_ref, len_ref, sk_ref, sv_ref, rk_ref, rv_ref, op_ref, ml_ref,  # as _epilogue_kernel's
    sg_ref,  # [D]: the layer's rotation signs (sigma, never read, where it has none)
    h_ref,  # [D, D] bf16: H * sqrt(D) (query_prep.hadamard_signs)
    cnt_in_ref,  # [H, B] int32: done-counters, zeros, aliased with cnt_ref (never read)
    o_ref,  # [r, D] in the model's dtype: the output, the value rotation undone
    ws_ref,  # [M, D] f32 (M >= 16): the merged output in the rotated space (scratch)
    cnt_ref,  # [H, B] int32: done-counters
    *, geo: Geometry, cfg: CacheConfig, DC: int, signs: bool, interpret: bool,
):
    """Windows, merge and finish, for caches that rotate their values: each channel block's
    program merges its channels into the scratch rows and counts itself done on its (sequence,
    kv head)'s counter; the last one reads the whole rows back, rotates them (one tensor-core
    dot, :func:`pallas_kernels.query_prep.store_finished`), applies the signs and stores them
    in the model's dtype. The rotation mixes all D channels, which no channel block holds."""
    del cnt_in_ref
    h, b, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d0, r = c * DC, o_ref.shape[0]
    window = _window_partial(q_ref, len_ref[b], sk_ref, sv_ref, rk_ref, rv_ref, op_ref.shape[1],
                             d0, geo=geo, cfg=cfg, DC=DC)
    _merge(op_ref, ml_ref, ws_ref, window, d0, geo=geo, DC=DC, r=r)
    done = qprep.arrive(cnt_ref, (h, b), interpret=interpret)

    @pl.when(done == pl.num_programs(2) - 1)
    def _finish():
        M, D = ws_ref.shape
        rows = jax.lax.broadcasted_iota(jnp.int32, (M, D), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (M, D), 1)
        out = plgpu.load(ws_ref.at[jnp.minimum(rows, r - 1), cols], mask=rows < r, other=0.0,
                         volatile=True)
        qprep.store_finished(out, o_ref, sg_ref, h_ref, cfg=cfg, signs=signs)


def _merge_kernel(
    op_ref,  # [NS, D, NV] f32: partial outputs (M-row, column order), the windows' among them
    ml_ref,  # [NS, 2, NV] f32: running maxima (row 0) and sums (row 1), column order
    o_ref,  # [r, D] f32: the output
    *, geo: Geometry, DC: int,
):
    """Merge only: the Mosaic kernel's window program left the windows' partial as one
    more split (``windows="kernel"``)."""
    _merge(op_ref, ml_ref, o_ref, None, pl.program_id(2) * DC, geo=geo, DC=DC)


def column_heads(geo: Geometry, r: int, n: int):
    """[n] int32: the head whose value columns include column col (the wgmma layout's
    slot k = 2 (col // 8) + col % 2 of thread c = (col % 8) // 2, k = uh * vg + token or
    channel group), -1 where no head of the r owns it (and past the geometry's NV)."""
    col = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    k = 2 * (col // 8) + col % 2
    uh = k // geo.vg
    h = 4 * uh + (col % 8) // 2
    return jnp.where((uh < geo.OWN) & (h < r) & (col < geo.NV), h, -1)


def _first_columns(geo: Geometry, n: int):
    """[n] int32: the first value column (token or channel group 0) of each column's head."""
    col = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    k0 = (2 * (col // 8) + col % 2) // geo.vg * geo.vg  # the slot of group 0
    return geo.col_of_slot(k0, (col % 8) // 2)


def _merge(op_ref, ml_ref, o_ref, window, d0, *, geo: Geometry, DC: int, r: int | None = None):
    """o[h, channels of M-rows d0 .. d0+DC] = sum_s w_s o_s / sum_s w_s l_s over the splits
    (and ``window``, (o [NH, DC] in the same M-row order, m [NH], l [NH]) when given),
    w_s = 2**(m_s - max m).

    The sums run in the partials' own column order: a channel block's M-rows are one
    contiguous [DC, NV] tile of each split (channels d0 .. d0+DC sit in M-rows d0 .. d0+DC,
    permuted), read whole and weighted column by column; columns no head owns are read and
    dropped. The columns of each head are summed once, at the end, and the rows stored at
    their channels (rows 0 .. r of ``o_ref``, default all of them)."""
    NS, NVp = op_ref.shape[0], next_pow2(geo.NV)  # the columns padded (tiles: powers of 2)
    r, NH = r or o_ref.shape[0], wb.WINDOW_HEADS
    S = max(1, min(_MERGE_STEP, _MERGE_ELEMS // (DC * NVp)))
    head = column_heads(geo, r, NVp)  # [NVp]
    owned = head >= 0

    # the running max of a column: its own (the epilogue: the Mosaic kernel repeats a head's
    # over its columns) or its head's first column's (the merge-only launch, as the XLA
    # merge reads it: the window program's partial holds it there only)
    m_at = _first_columns(geo, NVp) if window is None else None

    def stats(s0, n):  # (m, l) [n, NVp] of splits s0 .. s0 + n, NEG / 0 past NS and unowned
        ss = s0 + jax.lax.broadcasted_iota(jnp.int32, (n, NVp), 0)
        cc = jax.lax.broadcasted_iota(jnp.int32, (n, NVp), 1)
        ok = (ss < NS) & owned[None, :]
        sc, cc = jnp.minimum(ss, NS - 1), jnp.minimum(cc, geo.NV - 1)  # in bounds where masked
        mc = cc if m_at is None else jnp.broadcast_to(jnp.minimum(m_at, geo.NV - 1), (n, NVp))
        m = plgpu.load(ml_ref.at[sc, 0, mc], mask=ok, other=NEG)
        l = plgpu.load(ml_ref.at[sc, 1, cc], mask=ok, other=0.0)
        return jnp.where(ok, m, NEG), jnp.where(ok, l, 0.0), ok

    m_max = jnp.full((NVp,), NEG, jnp.float32)  # each column's maximum over the splits
    for s0 in range(0, NS, _SPLIT_STEP):
        m_max = jnp.maximum(m_max, jnp.max(stats(s0, _SPLIT_STEP)[0], axis=0))
    rows = d0 + jax.lax.broadcasted_iota(jnp.int32, (S, DC, NVp), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (S, DC, NVp), 2)

    def body(i, carry):  # splits i*S .. i*S + S: independent loads, one chain of adds
        acc, l_acc = carry
        m, l, ok = stats(i * S, S)
        w = jnp.where(ok, jnp.exp2(m - m_max[None, :]), 0.0)  # [S, NVp]
        l_acc = l_acc + jnp.sum(w * l, axis=0)
        ss = i * S + jax.lax.broadcasted_iota(jnp.int32, (S, DC, NVp), 0)
        o = plgpu.load(op_ref.at[jnp.minimum(ss, NS - 1), rows, jnp.minimum(cols, geo.NV - 1)],
                       mask=(ss < NS) & (cols < geo.NV), other=0.0)
        acc = acc + jnp.sum(jnp.where(ok[:, None, :], o * w[:, None, :], 0.0), axis=0)
        return acc, l_acc

    acc, l_acc = jax.lax.fori_loop(
        0, -(-NS // S), body, (jnp.zeros((DC, NVp), jnp.float32), jnp.zeros((NVp,), jnp.float32)))

    # each head's columns summed; the windows' partial merged per head
    hh = jax.lax.broadcasted_iota(jnp.int32, (DC, NH), 1)
    hw = jax.lax.broadcasted_iota(jnp.int32, (NH, DC), 0)
    h1 = jax.lax.broadcasted_iota(jnp.int32, (NH,), 0)
    out = jnp.zeros((DC, NH), jnp.float32)
    for h in range(r):
        mine = head == h
        o_h = jnp.sum(jnp.where(mine[None, :], acc, 0.0), axis=1)  # [DC]
        l_h = jnp.sum(jnp.where(mine, l_acc, 0.0))
        if window is not None:
            o_w, m_w, l_w = window
            m_h = jnp.max(jnp.where(mine, m_max, NEG))
            m_wh = jnp.max(jnp.where(h1 == h, m_w, NEG))
            top = jnp.maximum(m_h, m_wh)
            a, b = jnp.exp2(m_h - top), jnp.exp2(m_wh - top)
            o_wh = jnp.sum(jnp.where(hw == h, o_w, 0.0), axis=0)  # [DC]
            o_h = o_h * a + o_wh * b
            l_h = l_h * a + jnp.sum(jnp.where(h1 == h, l_w, 0.0)) * b
        # zero only where nothing is held; a NaN sum (non-finite key or value) stays NaN
        empty = l_h == 0
        o_h = jnp.where(empty, 0.0, o_h / jnp.where(empty, 1.0, l_h))
        out = jnp.where(hh == h, o_h[:, None], out)
    dd = geo.v_channel(d0 + jax.lax.broadcasted_iota(jnp.int32, (DC, NH), 0))
    plgpu.store(o_ref.at[hh, dd], out.astype(o_ref.dtype), mask=hh < r)  # (masked: unwritten)


def channel_blocks(B: int, H: int, D: int, sms: int | None) -> int:
    """Programs per (sequence, kv head), each merging its own block of channels: about two
    programs per SM where B x H alone leaves SMs idle (B 1 / H 8 on 132 SMs: 8 programs
    would read every split's partial through 8 SMs), blocks of at least 16 channels."""
    if not sms:
        return 1
    want = -(-2 * sms // (B * H))
    n = 1
    while n * 2 <= want and D // (n * 2) >= _MIN_CHANNELS and D % (n * 2) == 0:
        n *= 2
    return n


@functools.lru_cache(maxsize=64)
def _build_call(geo: Geometry, cfg: CacheConfig | None, shapes, r: int, n_dc: int,
                interpret: bool, out_dtype: str = "float32", finish: str | None = None):
    """Windows and merge (``cfg`` given; inputs q, lengths, the four windows, the partials)
    or the merge alone (``cfg`` None; inputs the partials); ``finish`` ("signs" or
    "rotation": the value rotation undone in the kernel, with or without the layer's signs;
    inputs then also the signs, H's signs and the done-counters)."""
    B, H, _, D, _ = shapes[0 if cfg is None else 6][0]  # the partials o_part
    full = lambda shape: pl.BlockSpec(shape, lambda h, b, c: (0,) * len(shape))  # noqa: E731
    per_bh = lambda shape: pl.BlockSpec(  # noqa: E731
        (None, None) + shape[2:], lambda h, b, c: (b, h) + (0,) * (len(shape) - 2))
    if finish:
        kernel = functools.partial(_finishing_epilogue_kernel, geo=geo, cfg=cfg, DC=D // n_dc,
                                   signs=finish == "signs", interpret=interpret)
        in_specs = [per_bh(shapes[0][0]), full(shapes[1][0])]
        in_specs += [per_bh(sh) for sh, _ in shapes[2:-2]]  # ... the partials, the signs
        in_specs += [full(shapes[-2][0]), full(shapes[-1][0])]
        M = max(qprep.MMA_ROWS, next_pow2(r))
        out_shape = [jax.ShapeDtypeStruct((B, H, r, D), jnp.dtype(out_dtype)),
                     jax.ShapeDtypeStruct((B, H, M, D), jnp.float32),  # scratch rows
                     jax.ShapeDtypeStruct(shapes[-1][0], jnp.int32)]  # counters, aliased
        kw = {} if interpret else {
            "compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
        return pl.pallas_call(
            kernel, grid=(H, B, n_dc), in_specs=in_specs,
            out_specs=[per_bh(o.shape) for o in out_shape[:2]] + [full(shapes[-1][0])],
            out_shape=out_shape, input_output_aliases={len(shapes) - 1: 2},
            interpret=interpret, name="innerq_mgpu_epilogue_finish", **kw)
    if cfg is None:
        kernel = functools.partial(_merge_kernel, geo=geo, DC=D // n_dc)
        in_specs = [per_bh(sh) for sh, _ in shapes]
    else:
        kernel = functools.partial(_epilogue_kernel, geo=geo, cfg=cfg, DC=D // n_dc)
        in_specs = [per_bh(shapes[0][0]), full(shapes[1][0])]
        in_specs += [per_bh(sh) for sh, _ in shapes[2:]]
    kw = {}
    if not interpret:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel,
        grid=(H, B, n_dc),
        in_specs=in_specs,
        out_specs=[per_bh((B, H, r, D))],
        out_shape=[jax.ShapeDtypeStruct((B, H, r, D), jnp.dtype(out_dtype))],
        interpret=interpret,
        name="innerq_mgpu_epilogue" if cfg is not None else "innerq_mgpu_merge",
        **kw,
    )


def _check_partials(o_part, ml_part, geo: Geometry, B: int, H: int, r: int, D: int):
    if r > wb.WINDOW_HEADS:
        raise ValueError(f"the epilogue takes at most {wb.WINDOW_HEADS} query heads per kv "
                         f"head, got {r}; use windows='xla' (windows and merge in XLA)")
    NS = o_part.shape[2] if o_part.ndim == 5 else 0
    if o_part.shape != (B, H, NS, D, geo.NV) or ml_part.shape != (B, H, NS, 2, geo.NV):
        raise ValueError(f"partials {o_part.shape} / {ml_part.shape} do not match [B, H, r, D] = "
                         f"{(B, H, r, D)} and the geometry's {geo.NV} value columns")


def _channel_blocks_arg(n_dc: int | None, B: int, H: int, D: int, interpret: bool) -> int:
    if n_dc is None:
        n_dc = channel_blocks(B, H, D, None if interpret else sm_count())
    if n_dc < 1 or D % n_dc or D // n_dc < _MIN_CHANNELS or (D // n_dc) & (D // n_dc - 1):
        raise ValueError(f"n_channel_blocks={n_dc}: D={D} must split into power-of-two blocks of "
                         f"at least {_MIN_CHANNELS} channels")
    return n_dc


def merge_partials(o_part: jax.Array, ml_part: jax.Array, geo: Geometry, r: int, *,
                   n_channel_blocks: int | None = None, interpret: bool = False) -> jax.Array:
    """The splits' partials merged, one launch; f32 [B, H, r, D], what
    ``combine_partials(o_part, ml_part, None, geo)`` gives in XLA. For ``windows="kernel"``,
    whose window program leaves the windows' partial as the last split.

    o_part [B, H, NS, D, NV] and ml_part [B, H, NS, 2, NV] as the Mosaic kernel writes them
    for ``geo``; r query heads per kv head; ``n_channel_blocks`` as in
    :func:`windows_and_merge`.
    """
    B, H, _, D = o_part.shape[:4]
    _check_partials(o_part, ml_part, geo, B, H, r, D)
    n_dc = _channel_blocks_arg(n_channel_blocks, B, H, D, interpret)
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in (o_part, ml_part))
    return call_quietly(_build_call(geo, None, shapes, r, n_dc, interpret), o_part, ml_part)[0]


def windows_and_merge(qp: jax.Array, layer: QuantLayer, lengths: jax.Array, cfg: CacheConfig,
                      o_part: jax.Array, ml_part: jax.Array, geo: Geometry, *,
                      n_channel_blocks: int | None = None, out_dtype=None,
                      finish_values: bool = False, interpret: bool = False) -> jax.Array:
    """Attention over the windows merged with the kernel's split partials, one launch;
    f32 [B, H, r, D] (or ``out_dtype``), what ``combine_partials(o_part, ml_part,
    window_partial(...), geo)`` gives in XLA.

    qp [B, H, r, D] (as the kernel's), lengths [B]; o_part [B, H, NS, D, NV] and ml_part
    [B, H, NS, 2, NV] as the Mosaic kernel writes them for ``geo``. ``n_channel_blocks``:
    programs per (sequence, kv head), each merging D / n_channel_blocks channels (default
    :func:`channel_blocks` for the device's SM count). ``finish_values`` (a cache that
    rotates its values): the output comes back in the model's space, the rotation and the
    layer's signs undone in the kernel (what ``finish_output`` gives in XLA), the last
    channel block's program of each (sequence, kv head) finishing it.
    """
    B, H, r, D = qp.shape
    _check_partials(o_part, ml_part, geo, B, H, r, D)
    if finish_values and not cfg.rotate_values:
        raise ValueError(f"finish_values=True undoes a value rotation; the cache "
                         f"{cfg.short_name()} rotates no values")
    sk, sv = (layer.sink_k, layer.sink_v) if cfg.sink else (layer.recent_k, layer.recent_v)
    inputs = [qp.astype(jnp.float32), jnp.asarray(lengths, jnp.int32), sk, sv, layer.recent_k,
              layer.recent_v, o_part, ml_part]
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    n_dc = _channel_blocks_arg(n_channel_blocks, B, H, D, interpret)
    # (interpret: the windows' hi / lo split of q needs exact bf16 roundings; the merge alone
    # does not)
    out_dtype = jnp.dtype(out_dtype or jnp.float32).name
    finish = None
    if finish_values:
        finish = "signs" if layer.rot_signs is not None else "rotation"
        # the signs [B, H, D] (sigma's, never read, where the layer has none), H's signs,
        # the done-counters: as the fused Triton kernel takes them (query_prep.side_operands)
        signs = layer.rot_signs if finish == "signs" else layer.k_scale
        inputs += [signs, jnp.asarray(qprep.hadamard_signs(D)), jnp.zeros((H, B), jnp.int32)]
        shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    return call_quietly(_build_call(geo, cfg, shapes, r, n_dc, interpret, out_dtype, finish),
                        *inputs, interpret=interpret)[0]

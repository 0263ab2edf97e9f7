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
  the splits and the windows, each split's columns read where the Mosaic kernel
  left them (a gather, exact in float32), eight splits' loads in flight per step,
  the output rows stored at their channels. Channel blocks spread the partials'
  reads over about two programs per SM: with one program per (sequence, kv head),
  B 1 / 128k read 49 splits' partials through 8 SMs (about 0.1 ms, round 8).

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
from pallas_kernels import window_blocks as wb
from pallas_kernels.mgpu_decode import sm_count
from pallas_kernels.mgpu_geometry import NEG, Geometry
from pallas_kernels.triton_ext import call_quietly

_SPLIT_STEP = 16  # splits per gather of the running maxima and sums
_MERGE_STEP = 8  # splits whose partials are read per merge step (their loads overlap)
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
    o_ref,  # [r, D] f32: the output
    *, geo: Geometry, cfg: CacheConfig, DC: int,
):
    b, d0 = pl.program_id(1), pl.program_id(2) * DC  # this program's channels d0 .. d0 + DC
    NS, D, NV = op_ref.shape
    r, ngc, NH = o_ref.shape[0], geo.ngc, wb.WINDOW_HEADS
    sizes = region_sizes(len_ref[b], cfg)

    def col(h, gt):  # value accumulator column of (head h, token group gt); h, gt arrays
        return geo.v_col(h // 4, gt, h % 4)

    o_w, m_w, l_w = wb.window_part(q_ref, wb.cache_windows(sk_ref, sv_ref, rk_ref, rv_ref,
                                                          sizes, cfg), D, v_cols=(d0, DC))

    def split_stats(s0):  # (m [STEP, NH], l [STEP, NH], valid) of splits s0 .. s0 + STEP
        ss = s0 + jax.lax.broadcasted_iota(jnp.int32, (_SPLIT_STEP, NH), 0)
        hh = jax.lax.broadcasted_iota(jnp.int32, (_SPLIT_STEP, NH), 1)
        ok = (ss < NS) & (hh < r)
        sc, hc = jnp.minimum(ss, NS - 1), jnp.minimum(hh, r - 1)  # in bounds where masked
        m = plgpu.load(ml_ref.at[sc, 0, col(hc, 0)], mask=ok, other=NEG)
        l = jnp.zeros((_SPLIT_STEP, NH), jnp.float32)
        for gt in range(ngc):
            l = l + plgpu.load(ml_ref.at[sc, 1, col(hc, gt)], mask=ok, other=0.0)
        return m, l, ok

    stats = [split_stats(s0) for s0 in range(0, NS, _SPLIT_STEP)]  # read once
    m_max = m_w
    for m, _, _ in stats:
        m_max = jnp.maximum(m_max, jnp.max(m, axis=0))
    w_w = jnp.exp2(m_w - m_max)
    l_tot = w_w * l_w
    for m, l, ok in stats:
        l_tot = l_tot + jnp.sum(jnp.where(ok, jnp.exp2(m - m_max[None, :]) * l, 0.0), axis=0)

    # accumulator [DC, NH]: channel d0 + i, head h; a split's channel d sits in M-row v_row(d)
    dd = d0 + jax.lax.broadcasted_iota(jnp.int32, (DC, NH), 0)
    hh = jax.lax.broadcasted_iota(jnp.int32, (DC, NH), 1)
    rows = geo.v_row(dd)
    head_ok = hh < r
    cols = [col(jnp.minimum(hh, r - 1), gt) for gt in range(ngc)]
    h1 = jax.lax.broadcasted_iota(jnp.int32, (NH,), 0)
    col1 = col(jnp.minimum(h1, r - 1), 0)

    def body(i, acc):  # splits s0 .. s0 + _MERGE_STEP: independent loads, one chain of adds
        s0 = i * _MERGE_STEP
        for k in range(min(_MERGE_STEP, NS)):
            s = s0 + k
            live = s < NS
            sc = jnp.minimum(s, NS - 1)
            m_s = plgpu.load(ml_ref.at[sc, 0, col1], mask=(h1 < r) & live, other=NEG)
            w_s = jnp.where((h1 < r) & live, jnp.exp2(m_s - m_max), 0.0)
            o_s = jnp.zeros((DC, NH), jnp.float32)
            for c in cols:
                o_s = o_s + plgpu.load(op_ref.at[sc, rows, c], mask=head_ok & live, other=0.0)
            acc = acc + o_s * w_s[None, :]
        return acc

    n_steps = -(-NS // _MERGE_STEP)
    acc = jax.lax.fori_loop(0, n_steps, body, o_w.T * w_w[None, :])
    # zero only where nothing is held; a NaN l_tot (non-finite key or value) stays NaN
    empty = l_tot == 0
    out = jnp.where(empty[None, :], 0.0, acc / jnp.where(empty, 1.0, l_tot)[None, :])
    plgpu.store(o_ref.at[hh, dd], out, mask=head_ok)  # (masked rows: never written)


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
def _build_call(geo: Geometry, cfg: CacheConfig, shapes, n_dc: int, interpret: bool):
    B, H, r, D = shapes[0][0]
    full = lambda shape: pl.BlockSpec(shape, lambda h, b, c: (0,) * len(shape))  # noqa: E731
    per_bh = lambda shape: pl.BlockSpec(  # noqa: E731
        (None, None) + shape[2:], lambda h, b, c: (b, h) + (0,) * (len(shape) - 2))
    in_specs = [per_bh(shapes[0][0]), full(shapes[1][0])]
    in_specs += [per_bh(sh) for sh, _ in shapes[2:]]
    kw = {}
    if not interpret:
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        functools.partial(_epilogue_kernel, geo=geo, cfg=cfg, DC=D // n_dc),
        grid=(H, B, n_dc),
        in_specs=in_specs,
        out_specs=[per_bh((B, H, r, D))],
        out_shape=[jax.ShapeDtypeStruct((B, H, r, D), jnp.float32)],
        interpret=interpret,
        name="innerq_mgpu_epilogue",
        **kw,
    )


def windows_and_merge(qp: jax.Array, layer: QuantLayer, lengths: jax.Array, cfg: CacheConfig,
                      o_part: jax.Array, ml_part: jax.Array, geo: Geometry, *,
                      n_channel_blocks: int | None = None, interpret: bool = False) -> jax.Array:
    """Attention over the windows merged with the kernel's split partials, one launch;
    f32 [B, H, r, D], what ``combine_partials(o_part, ml_part, window_partial(...), geo)``
    gives in XLA.

    qp [B, H, r, D] (as the kernel's), lengths [B]; o_part [B, H, NS, D, NV] and ml_part
    [B, H, NS, 2, NV] as the Mosaic kernel writes them for ``geo``. ``n_channel_blocks``:
    programs per (sequence, kv head), each merging D / n_channel_blocks channels (default
    :func:`channel_blocks` for the device's SM count).
    """
    B, H, r, D = qp.shape
    if r > wb.WINDOW_HEADS:
        raise ValueError(f"windows_and_merge takes at most {wb.WINDOW_HEADS} query heads per kv "
                         f"head, got {r}; use windows='xla' for more")
    NS = o_part.shape[2]
    if o_part.shape != (B, H, NS, D, geo.NV) or ml_part.shape != (B, H, NS, 2, geo.NV):
        raise ValueError(f"partials {o_part.shape} / {ml_part.shape} do not match qp {qp.shape} "
                         f"and the geometry's {geo.NV} value columns")
    sk, sv = (layer.sink_k, layer.sink_v) if cfg.sink else (layer.recent_k, layer.recent_v)
    inputs = [qp.astype(jnp.float32), jnp.asarray(lengths, jnp.int32), sk, sv, layer.recent_k,
              layer.recent_v, o_part, ml_part]
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    n_dc = n_channel_blocks
    if n_dc is None:
        n_dc = channel_blocks(B, H, D, None if interpret else sm_count())
    if n_dc < 1 or D % n_dc or D // n_dc < _MIN_CHANNELS or (D // n_dc) & (D // n_dc - 1):
        raise ValueError(f"n_channel_blocks={n_dc}: D={D} must split into power-of-two blocks of "
                         f"at least {_MIN_CHANNELS} channels")
    return call_quietly(_build_call(geo, cfg, shapes, n_dc, interpret), *inputs)[0]

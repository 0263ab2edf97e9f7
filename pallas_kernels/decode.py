"""Fused decode attention over a quantized cache (flash-decoding), kernel (c).

``quantized_decode_attention(qp, layer, lengths, cfg)`` equals
``innerq_jax.reference.quantized_attention_core`` (the reference): softmax over
the bf16 sink window, the packed quantized region and the bf16 recent ring,
then the probability-weighted values.

One ``pallas_call`` with grid (splits + window programs, Hkv, B):

* program (s < splits, h, b) walks the quantized tokens
  [s * chunk, min((s + 1) * chunk, Nq[b])) of sequence b, kv head h, in blocks
  of ``block_tokens``: key scores, an online softmax (running max and sum) and
  the probability-weighted values, K and V of a block in the same iteration;
* programs (splits + w, h, b) cover the sink and recent windows (bf16, with a
  hi/lo bf16 split of q and p so they keep f32 accuracy), each an equal run of
  their rows;
* each program writes its unnormalised output, running max and sum to a
  scratch output and bumps a per-(b, h) counter (atomic); the last program of
  (b, h) merges the partials (``_combine_partials``), so one launch does all.

Through the dispatch (``prep`` given) the merging program finishes the output (value
rotation undone, the query's dtype) and q_ref holds the model's query heads, sigma and
the softmax scale applied as they are gathered (:mod:`pallas_kernels.query_prep`): for
a cache that rotates no keys the call is this one launch from the model's query to the
model's output. The query's rotation, where the cache rotates keys, is XLA's by default
(``rotate_query``).

Per-block math: :mod:`pallas_kernels.innerq_blocks` (InnerQ) and
:mod:`pallas_kernels.outerq_blocks` (OuterQ, same fused structure). The
quantized region's offsets come from :mod:`innerq_jax.layout`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from innerq_jax.reference import quantized_attention_core
from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import region_sizes
from pallas_kernels import innerq_blocks as ib
from pallas_kernels import mixed_blocks as mb
from pallas_kernels import outerq_blocks as ob
from pallas_kernels import query_prep as qprep
from pallas_kernels import window_blocks as wb
from pallas_kernels.device_info import FALLBACK_SMS, sm_count
from pallas_kernels.innerq_blocks import NEG, Geometry, next_pow2
from pallas_kernels.query_prep import QueryPrep
from pallas_kernels.triton_ext import call_quietly


def quantized_decode_attention_reference(qp, layer, lengths, cfg):
    """The contract: innerq_jax.reference.quantized_attention_core."""
    return quantized_attention_core(qp, layer, lengths, cfg)


# ------------------------------------------------------------------- kernels
def _fused_kernel(
    q_ref,  # [r, D] f32: this (sequence, kv head)'s queries, sigma / rotation / scale folded in
    len_ref,  # [B] int32: tokens in each sequence (regions and live ring slots follow from it)
    kw_ref,  # [Tq/P, P*nw] uint32: key code words, P tokens per row
    ks_ref,  # key scales: grouped along D [Tq/P, P*ng]; along T [Tq/G, D] (fp8 as uint8)
    kz_ref,  # key zero-points, as ks_ref
    vw_ref,  # [Tq/cpw, D] uint32: value code words packed along T
    vs_ref,  # value scales: along T [Tq/G, D]; along D [Tq, D/G]
    vz_ref,  # value zero-points, as vs_ref
    sk_ref,  # [S, D] bf16: the sink window (the ring again, never read, when S = 0)
    sv_ref,  # [S, D] bf16
    rk_ref,  # [W, D] bf16: the recent ring
    rv_ref,  # [W, D] bf16
    sig_ref,  # [D] f32: sigma (read where prep is given)
    sg_ref,  # [D]: the layer's rotation signs (read where prep is given and the layer has them)
    h_ref,  # [D, D] bf16: H * sqrt(D) (read where prep is given and the cache rotates)
    cnt_in_ref,  # [H, B] int32: done-counters, aliased with cnt_ref (never read)
    o_ref,  # [r, D]: the output (f32; prep.out_dtype where prep is given)
    po_ref,  # [NS + WP, NR, D] f32: each program's partial output (scratch)
    pm_ref,  # [NS + WP, NR] f32: its running max
    pl_ref,  # [NS + WP, NR] f32: its softmax denominator
    *rest,  # (qs_ref [r, D] f32: this program's rotated q' (scratch), where prep_query and
    # the cache rotates keys), cnt_ref
    geo, cfg: CacheConfig, num_splits: int, chunk: int, part, interpret: bool,
    window_rows: int, window_programs: int, prep: QueryPrep | None, prep_query: bool,
    signs: bool,
):
    """Grid (num_splits + window_programs, H, B); ``part`` is the layout's quantized-region
    loop.

    Every program stores its partial (o, running max m, sum l) in slot s of
    the scratch outputs, then counts itself done on a per-(b, h) counter; the
    last of the num_splits + window_programs programs of (b, h) merges the partials and writes
    the output (no separate combine launch). The region sizes and the live ring slots
    are computed here from the length (:mod:`innerq_jax.layout`'s formulas), so the op
    is this one launch: a jnp prelude costs a launch of its own per call, and at short
    contexts launches, not the kernel, set the time (benchmarks/KERNEL_NOTES.md). With
    ``prep``, the last program finishes the output (value rotation undone, the query's
    dtype; :mod:`pallas_kernels.query_prep`), and with ``prep_query`` q_ref holds the
    model's query heads: sigma and the softmax scale are applied as q is gathered, or,
    where the cache rotates keys, each program prepares q' into its own scratch rows.
    """
    del cnt_in_ref
    *qs, cnt_ref = rest
    quant_refs = (kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref)
    s, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    NR, D = geo.NR, geo.D
    if prep_query and not cfg.rotate_keys:  # sigma and scale applied as q is gathered
        q_ref = ib.ScaledQuery(q_ref, sig_ref, prep.softmax_scale)
    elif prep_query:  # the rotation mixes channels: q' goes through the scratch rows
        qs_ref, = qs
        qprep.store_prepared(q_ref, sig_ref, sg_ref, h_ref, qs_ref, prep=prep, cfg=cfg,
                             signs=signs)
        if not interpret:
            plgpu.debug_barrier()  # the rows every thread stored, before any thread gathers
        q_ref = qs_ref

    def store_partial(o, m, l, rows):
        rr = jax.lax.broadcasted_iota(jnp.int32, (rows, D), 0)
        cc = jax.lax.broadcasted_iota(jnp.int32, (rows, D), 1)
        plgpu.store(po_ref.at[s, rr, cc], o, mask=rr < NR)
        r1 = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
        plgpu.store(pm_ref.at[s, r1], m, mask=r1 < NR)
        plgpu.store(pl_ref.at[s, r1], l, mask=r1 < NR)

    sizes = region_sizes(len_ref[b], cfg)

    @pl.when(s < num_splits)
    def _quantized():
        nq = sizes.quantized
        o, m, l = part(q_ref, quant_refs, nq, s * chunk, chunk, geo)
        store_partial(o, m, l, NR)

    @pl.when(s >= num_splits)
    def _windows():
        windows = wb.cache_windows(sk_ref, sv_ref, rk_ref, rv_ref, sizes, cfg)
        o, m, l = wb.window_part(q_ref, windows, D, chunk=window_rows,
                                 part=(s - num_splits, window_programs))
        store_partial(o, m, l, wb.WINDOW_HEADS)

    done = qprep.arrive(cnt_ref, (h, b), interpret=interpret)
    n_parts = num_splits + window_programs

    @pl.when(done == n_parts - 1)
    def _combine():
        rows = _merge_rows(NR, cfg, prep)
        out = _combine_partials(po_ref, pm_ref, pl_ref, n_parts, NR, rows, D)
        if prep is None:
            hh = jax.lax.broadcasted_iota(jnp.int32, (NR, D), 0)
            dd = jax.lax.broadcasted_iota(jnp.int32, (NR, D), 1)
            plgpu.store(o_ref.at[hh, dd], out, mask=hh < o_ref.shape[0])
        else:
            qprep.store_finished(out, o_ref, sg_ref, h_ref, cfg=cfg, signs=signs)


def _merge_rows(NR, cfg: CacheConfig, prep: QueryPrep | None) -> int:
    """Rows of the merged output: the NR query rows, at least 16 where the merging program
    also undoes the value rotation (its tensor-core dot needs them)."""
    return max(NR, qprep.MMA_ROWS) if prep is not None and cfg.rotate_values else NR


# the merge loads every partial in one round where they are at most this many f32 values
# (64 per thread of a 4-warp program); more go through in steps of 8 splits, maxima first
MERGE_ONCE = 8192


def _combine_partials(po_ref, pm_ref, pl_ref, n, NR, rows, D, step=8):
    """o [rows, D] = sum_s w_s o_s / sum_s w_s l_s, w_s = 2**(m_s - max m) (rows >= NR; rows
    past NR are 0); 0 where nothing is held, NaN where a partial is NaN (as the reference
    gives).

    The partials come from other CTAs: volatile loads (past L1, which is not
    coherent across SMs; jax 0.11's ".cg" cache modifier string is broken). Where they are
    few (n * rows * D <= MERGE_ONCE) they are all loaded before any is used, one round trip
    to L2 on the launch's critical path instead of one for the maxima and one more for the
    rest.
    """
    def load(ref, idx, ok, other):
        return plgpu.load(ref.at[idx], mask=ok, other=other, volatile=True)

    def split_rows(s0, shape):
        ss = s0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        hh = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        return jnp.minimum(ss, n - 1), jnp.minimum(hh, NR - 1), (ss < n) & (hh < NR)

    def partials(s0, size):  # splits s0 .. s0 + size: (max, sum, output, valid), padded
        sc, h2, ok = split_rows(s0, (size, rows))
        s3, h3, ok3 = split_rows(s0, (size, rows, D))
        d3 = jax.lax.broadcasted_iota(jnp.int32, (size, rows, D), 2)
        return (load(pm_ref, (sc, h2), ok, NEG), load(pl_ref, (sc, h2), ok, 0.0),
                load(po_ref, (s3, h3, d3), ok3, 0.0), ok)

    def weighted(pm, pl_, po, ok, m_max):  # (sum_s w_s o_s, sum_s w_s l_s)
        w = jnp.where(ok, jnp.exp2(pm - m_max[None, :]), 0.0)
        return jnp.sum(w[:, :, None] * po, axis=0), jnp.sum(w * pl_, axis=0)

    if n * rows * D <= MERGE_ONCE:
        pm, pl_, po, ok = partials(0, next_pow2(n))
        return _normalized(*weighted(pm, pl_, po, ok, jnp.max(pm, axis=0)))
    m_max = jnp.full((rows,), NEG, jnp.float32)
    for s0 in range(0, n, step):
        sc, h2, ok = split_rows(s0, (step, rows))
        m_max = jnp.maximum(m_max, jnp.max(load(pm_ref, (sc, h2), ok, NEG), axis=0))
    o_tot = jnp.zeros((rows, D), jnp.float32)
    l_tot = jnp.zeros((rows,), jnp.float32)
    for s0 in range(0, n, step):
        o_s, l_s = weighted(*partials(s0, step), m_max)
        o_tot, l_tot = o_tot + o_s, l_tot + l_s
    return _normalized(o_tot, l_tot)


def _normalized(o_tot, l_tot):
    """o_tot / l_tot per row; zero only where nothing is held (l_tot == 0): a NaN l_tot (a
    non-finite key or value) must reach the output, as in the reference."""
    empty = l_tot[:, None] == 0
    return jnp.where(empty, 0.0, o_tot / jnp.where(empty, 1.0, l_tot[:, None]))


def _innerq_part(q_ref, refs, nq, start, chunk, geo: Geometry):
    """Online softmax over the quantized tokens [start, min(start + chunk, nq))."""
    kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
    qexp, koff, qsum_cols = ib.expanded_query(q_ref, geo)

    def scores(base):
        kw, ks, kz = ib.load_key_block(kw_ref, ks_ref, kz_ref, base, nq, geo)
        return ib.block_key_scores(kw, ks, kz, qexp, koff, qsum_cols, geo)  # [BT, NR]

    def values(base, p):
        pexp, psum, poff = ib.value_operands(p, geo)
        vwt, vst, vzt = ib.load_value_block(vw_ref, vs_ref, vz_ref, base, nq, geo)
        return ib.block_value_sum(vwt, vst, vzt, pexp, psum, poff, geo)

    return ib.online_softmax_loop(start, nq, chunk, geo, scores, values)


# ------------------------------------------------------------------- wrapper
def _part(layout):
    """The quantized-region part of one (K grouping, V grouping) layout."""
    if layout == ("d", "t"):
        return _innerq_part
    if layout == ("t", "d"):
        return ob.outerq_part
    return mb.mixed_part(layout)


@functools.lru_cache(maxsize=64)
def _build_call(cfg, layout, geo, NS, chunk, shapes, num_warps, num_stages, interpret,
                window_rows, window_programs, prep, prep_query, signs):
    """The pallas_call for one static configuration (cached so jit caches hit)."""
    B, H, r, D = shapes[0][0]
    NR, NP = geo.NR, NS + window_programs
    full = lambda shape: pl.BlockSpec(shape, lambda s, h, b: (0,) * len(shape))
    per_bh = lambda shape: pl.BlockSpec(
        (None, None) + shape[2:], lambda s, h, b: (b, h) + (0,) * (len(shape) - 2))
    in_specs = [per_bh(shapes[0][0]), full(shapes[1][0])]
    in_specs += [per_bh(sh) for sh, _ in shapes[2:-2]] + [full(shapes[-2][0]),
                                                           full(shapes[-1][0])]
    out_dtype = jnp.float32 if prep is None else jnp.dtype(prep.out_dtype)
    out_shape = [
        jax.ShapeDtypeStruct((B, H, r, D), out_dtype),
        jax.ShapeDtypeStruct((B, H, NP, NR, D), jnp.float32),  # partials (scratch)
        jax.ShapeDtypeStruct((B, H, NP, NR), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NP, NR), jnp.float32),
    ]
    out_specs = [per_bh(s.shape) for s in out_shape]
    if prep_query and cfg.rotate_keys:  # each program's q' (scratch)
        out_shape.append(jax.ShapeDtypeStruct((B, H, NP, r, D), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, r, D),
                                      lambda s, h, b: (b, h, s, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct(shapes[-1][0], jnp.int32))  # done-counter, aliased
    out_specs.append(full(shapes[-1][0]))
    kernel = functools.partial(
        _fused_kernel, geo=geo, cfg=cfg, num_splits=NS, chunk=chunk,
        part=_part(layout), interpret=interpret, window_rows=window_rows,
        window_programs=window_programs, prep=prep, prep_query=prep_query, signs=signs,
    )
    call = pl.pallas_call(
        kernel,
        grid=(NP, H, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={len(shapes) - 1: len(out_shape) - 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{cfg.kind}_decode_attention",
    )
    return lambda *args: call(*args)[:1]


def _default_splits(B, H, n_blocks, sms: int):
    """Programs per (sequence, kv head) over the quantized region, for a device of ``sms``
    SMs. Where every (sequence, kv head, block) fits in one wave (B * H * n_blocks <= sms),
    one block per program: the programs all run at once and a program's set-up, not the
    tokens, sets the time (H200, SmolLM2 B 1 / 1k: 7 splits 6.7 us of device time against
    3 splits 7.6, benchmarks/KERNEL_NOTES.md, round 21). Otherwise about 4 programs per SM
    and at least 2 blocks per program: at the 8B shape's B 1 / 4k (248 blocks) one block
    per program spent more on the per-program set-up than on the tokens (16 splits 0.0445
    ms vs 32 splits 0.0531)."""
    if B * H * n_blocks <= sms:
        return int(n_blocks)
    return int(max(1, min(n_blocks // 2, round(4 * sms / (B * H)))))


# window programs per (sequence, kv head) where the quantized region runs one block per
# program (H200, SmolLM2 B 1 / 1k: 1 / 2 / 3 programs 6.1 / 5.1 / 4.9 us of device time;
# benchmarks/KERNEL_NOTES.md, round 22)
SHORT_WINDOW_PROGRAMS = 3


def _default_window_programs(NS, n_blocks, rows, D):
    """Window programs for a call of NS splits whose merge holds ``rows`` rows of D
    (:func:`_merge_rows`): where each split is one block, the window program's rows
    (S + R + G) are the longest program, and SHORT_WINDOW_PROGRAMS share them, as long as the
    merge still loads every partial in one round (MERGE_ONCE: the stepped merge cost more
    than the window rows saved at SmolLM2 B 1 / 4k, 7.7 against 6.4 us); elsewhere the
    quantized programs are the longest and one window program is enough."""
    wp = SHORT_WINDOW_PROGRAMS
    if NS == n_blocks and (NS + wp) * rows * D <= MERGE_ONCE:
        return wp
    return 1


def quantized_decode_attention(
    qp: jax.Array,
    layer: QuantLayer,
    lengths: jax.Array,
    cfg: CacheConfig,
    *,
    interpret: bool = False,
    block_tokens: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    unpack_chunk: int = 0,
    window_rows: int = wb.WINDOW_ROWS,
    window_programs: int | None = None,
    max_registers: int | None = None,
    prep: QueryPrep | None = None,
    rotate_query: str | None = None,
    counters: jax.Array | None = None,
) -> jax.Array:
    """Fused decode attention; returns f32 [B, Hkv, n_rep, D] = quantized_attention_core(...).

    qp [B, Hkv, n_rep, D] f32 (sigma, rotation and softmax scale folded in);
    lengths [B] int32. With ``prep`` (:class:`pallas_kernels.query_prep.QueryPrep`), qp is
    instead the model's query heads (``split_heads(q, Hkv)``, any float dtype), prepared in
    the kernel, and the output is finished there too: [B, Hkv, n_rep, D] in
    ``prep.out_dtype``, the value rotation undone, what ``prepare_query`` before and
    ``finish_output`` after the call give, in the one launch; ``rotate_query`` says where
    the query's Hadamard rotation runs where the cache rotates keys: "xla" (default: then
    q' is prepared by XLA before the call, one launch more) or "kernel" (each program's
    prologue: one tensor-core dot with H, loaded from L2; on the H200 that cost 13 us at
    B 8 / 4k in two runs, 11 us or nothing at B 1 / 32k, and saved 6-14 us at B 1 / 4k,
    benchmarks/KERNEL_NOTES.md, round 10). ``counters``: [Hkv, B] int32 zeros the kernel
    takes for its done-counters (and leaves used: scratch, not to be read or passed again),
    such as the cache write's (``QuantLayer.append_with_counters``); by default the call
    zeroes its own, a memset launch of its own per call.

    Tunables: ``block_tokens`` (tokens per loop iteration), ``num_splits`` (programs per
    sequence and head over the quantized region; default fills the GPU), ``num_warps``,
    ``num_stages`` (Triton), ``unpack_chunk`` (code pairs unpacked per inline-asm call),
    ``max_registers`` (registers per thread cap, 0 = ptxas decides, None = the layout's
    default; see :func:`pallas_kernels.triton_ext.unpack_pairs_bf16`), ``window_rows`` (bf16
    window rows per step of a window program), ``window_programs`` (programs per sequence
    and head sharing the windows' rows; default :func:`_default_window_programs`). Defaults
    are the fastest points of the H200 sweep in benchmarks/KERNEL_NOTES.md.
    """
    if cfg.kind not in ("innerq", "outerq"):
        raise ValueError(f"quantized_decode_attention needs an innerq/outerq cache, got {cfg.kind!r}")
    B, H, r, D = qp.shape
    if layer.k_scale.shape != (B, H, D):
        raise ValueError(f"qp {qp.shape} does not match the cache (k_scale {layer.k_scale.shape})")
    if rotate_query not in (None, "xla", "kernel"):
        raise ValueError(f"rotate_query={rotate_query!r}; choose 'xla' or 'kernel'")
    if counters is not None and (counters.shape != (H, B) or counters.dtype != jnp.int32):
        raise ValueError(f"counters {counters.shape} {counters.dtype}: the done-counters must "
                         f"be [Hkv, B] = [{H}, {B}] int32 zeros")
    prep_query = prep is not None
    if prep is not None:
        qprep.check_query(qp, layer)
        if cfg.rotate_keys and (rotate_query or "xla") == "xla":
            qp, prep_query = qprep.prepare_xla(qp, layer, cfg, prep), False
    G, bits, S, Tq = cfg.group_size, cfg.bits, cfg.sink, cfg.quant_capacity
    layout = (layer.k.grouping, layer.v.grouping)
    if layout not in mb.LAYOUTS:
        raise ValueError(f"K grouping {layout[0]!r} / V grouping {layout[1]!r} is not a layout "
                         f"the fused kernel reads; layouts: {mb.LAYOUTS}")
    if window_rows not in (16, 32, 64, 128):
        raise ValueError(f"window_rows={window_rows}; choose 16, 32, 64 or 128")
    if window_programs is not None and (not isinstance(window_programs, int)
                                        or not 1 <= window_programs <= 8):
        raise ValueError(f"window_programs={window_programs!r}; choose an int from 1 to 8")
    BT = block_tokens or ib.default_block_tokens(bits, G)  # every layout shares these
    if max_registers is None:
        max_registers = ib.DEFAULT_MAX_REGISTERS
    # Keys grouped along D may group by fewer channels than the flush group G (their own
    # QuantizedTensor.group_size); values keep G.
    gk = layer.k.group_size if layout[0] == "d" and layer.k.group_size != G else 0
    if gk and layout[1] == "d":
        raise ValueError(f"keys and values both grouped along D need one group size; got keys "
                         f"{gk}, values {G}")
    extra = {"Gk": gk} if gk else {}
    geo = mb.geometry_class(layout)(bits=bits, G=G, D=D, n_rep=r, BT=BT,
                                    unpack_chunk=unpack_chunk, max_registers=max_registers,
                                    **extra)
    geo.validate()
    n_blocks = max(1, pl.cdiv(Tq, BT))
    # the SM count of the device the kernel compiles for; interpret mode (a CPU) lays out
    # the grid of an H100 / H200
    sms = (None if interpret else sm_count()) or FALLBACK_SMS
    NS = num_splits or _default_splits(B, H, n_blocks, sms)
    chunk = pl.cdiv(pl.cdiv(Tq, NS), BT) * BT  # tokens per split, whole blocks
    NS = max(1, pl.cdiv(Tq, chunk))
    WP = window_programs or _default_window_programs(NS, n_blocks,
                                                     _merge_rows(geo.NR, cfg, prep), D)

    lengths = jnp.asarray(lengths, jnp.int32)
    quant = mb.kernel_operands(layer, geo)
    inputs = [qp if prep_query else qp.astype(jnp.float32), lengths, *quant]
    # without sinks the ring fills the sink operands' places (the kernel never reads them),
    # so the kernel's parameters are the same for every configuration
    inputs += [layer.sink_k, layer.sink_v] if S else [layer.recent_k, layer.recent_v]
    inputs += [layer.recent_k, layer.recent_v, *qprep.side_operands(layer, cfg, prep),
               jnp.zeros((H, B), jnp.int32) if counters is None else counters]
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in inputs)
    call = _build_call(cfg, layout, geo, NS, chunk, shapes, num_warps, num_stages, interpret,
                       window_rows, WP, prep, prep_query, layer.rot_signs is not None)
    return call_quietly(call, *inputs, interpret=interpret)[0]

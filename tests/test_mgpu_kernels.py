"""The Mosaic GPU InnerQ kernel (pallas_kernels/mgpu_decode.py).

Mosaic GPU's CPU interpreter cannot run pipelined copies, so the kernel itself
runs only on a Hopper GPU. The default (CPU) suite checks every piece that can
run without one:

* the lop3 pair unpack (the bit trick) against codes unpacked by numpy;
* the tile geometry: every column, row, channel and Pexp slot map is a bijection;
* the per-thread code of every block step (pallas_kernels/mgpu_block.py), run by
  a numpy SIMT simulator of the warpgroup (tests/mgpu_simt.py) with the wgmma
  modelled as a float32 matrix product, over whole programs of the kernel, then
  the real XLA parts (query operands, windows, merge of split partials), against
  the reference ``quantized_attention_core``;
* the lowering of the whole kernel to Mosaic GPU IR for every configuration.

``pytest -m gpu tests/test_mgpu_kernels.py`` runs the compiled kernel on the same
grid (it skips, saying why, where no Hopper GPU is present).

Tolerance: the kernel feeds the tensor cores bf16 operands (q * 2**-e and
p * 2**-e; the codes are exact), as the Triton kernel does: relative L2 < 1e-2
(tests/test_kernels.py explains the bound). NaN never passes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mgpu_simt as simt
from kernel_cases import abstract_h200
from kernel_cases import cache_after_appends as _cache
from kernel_cases import kv_with_outliers as _kv
from innerq_jax import CacheConfig, KVCache
from innerq_jax.layout import region_sizes
from innerq_jax.reference import prepare_query, quantized_attention_core
from pallas_kernels import mgpu_block as blk
from pallas_kernels import mgpu_decode as md
from pallas_kernels.mgpu_epilogue import merge_partials, windows_and_merge
from pallas_kernels.mgpu_geometry import Geometry, pair_plan, unpack_pair_reference
from pallas_kernels.query_prep import QueryPrep

TOL = 1e-2


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "kernel output has NaN/Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _query(cache, Hq, seed=1):
    layer = cache.layer(0)
    D = cache.head_dim
    q = jax.random.normal(jax.random.PRNGKey(seed), (cache.batch, Hq, D), jnp.float32)
    return prepare_query(q, layer, cache.config, 1.0 / math.sqrt(D))


# name: (config, D, Hq, Hkv, lengths, appends, kernel options). Lengths cover a full
# sequence (several blocks, a partial last block), one inside the sink, one with no
# quantized token (recent only), one inside the first group of the quantized region,
# and one whose window flushes a group during the appends.
GRID = {
    "innerq2-G32-D128-gqa4": (CacheConfig.innerq(capacity=640), 128, 8, 2,
                              [630, 3, 140, 4 + 128 + 32 + 5, 197], 3, dict(num_splits=2)),
    "innerq2-G64-D128-gqa4": (CacheConfig.innerq(group_size=64, capacity=704), 128, 8, 2,
                              [700, 2, 100, 4 + 128 + 64 + 9], 2, dict(num_splits=3)),
    "innerq4-G32-D128-gqa4": (CacheConfig.innerq(bits=4, capacity=512), 128, 8, 2,
                              [505, 180, 1, 4 + 128 + 32 + 1], 0, dict(num_splits=2)),
    "innerq4-G64-D64-smollm": (CacheConfig.innerq(bits=4, group_size=64, recent=64, capacity=512),
                               64, 9, 3, [500, 2, 200], 2, dict(num_splits=2)),
    "innerq2-G32-D64-smollm": (CacheConfig.innerq(capacity=512), 64, 9, 3, [510, 300, 1], 1,
                               dict(num_splits=2)),
    "innerq2-G64-D128-mha": (CacheConfig.innerq(group_size=64, capacity=512), 128, 2, 2,
                             [512, 250, 70], 3, dict(num_splits=1)),
    "innerq2-G32-D64-mha-bt256": (CacheConfig.innerq(capacity=608), 64, 2, 2, [600, 40], 0,
                                  dict(num_splits=1, block_tokens=256)),
    "innerq4-G64-D128-gqa8": (CacheConfig.innerq(bits=4, group_size=64, capacity=512), 128, 16, 2,
                              [480, 230], 0, dict(num_splits=2)),
    "innerq2-nosink": (CacheConfig.innerq(sink=0, capacity=512), 64, 4, 1, [480, 33], 3,
                       dict(num_splits=2)),
    # the recommended cache (InnerQ-H: rotation, key centring; 36 sinks, 96 recent), which
    # the H200 dispatch runs on this kernel at long contexts
    "recommended-D128-gqa4": (CacheConfig.recommended(capacity=704), 128, 8, 2,
                              [700, 30, 36 + 128 + 32 + 3, 150], 2, dict(num_splits=2)),
}


# ------------------------------------------------------------------ bit tricks
@pytest.mark.parametrize("bits", [2, 4])
def test_pair_unpack_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    cpw, half = 32 // bits, 16 // bits
    codes = (words[:, None].astype(np.int64) >> (bits * np.arange(cpw))) & ((1 << bits) - 1)
    ops = simt.SimOps()
    for j, (_, e) in enumerate(pair_plan(bits)):
        lo, hi = unpack_pair_reference(words, bits, j)
        np.testing.assert_array_equal(lo, 128.0 + codes[:, j] * 2.0**e)
        np.testing.assert_array_equal(hi, 128.0 + codes[:, j + half] * 2.0**e)
        # the kernel's own expression (blk._unpack) through the simulator backend
        w128 = words[:128].astype(np.int64)
        lo2, hi2 = blk._unpack(ops, w128, bits, j, {})
        np.testing.assert_array_equal(lo2, lo[:128])
        np.testing.assert_array_equal(hi2, hi[:128])
        # every value is exact in bf16 (the A operand loses nothing)
        assert np.array_equal(lo.astype(ml_dtypes.bfloat16).astype(np.float32), lo)


# -------------------------------------------------------------------- geometry
GEOS = [Geometry(b, G, D, r, BT) for b, G, D, r, BT in [
    (2, 32, 128, 4, 128), (2, 64, 128, 4, 256), (4, 32, 128, 4, 128), (4, 64, 64, 3, 64),
    (2, 32, 64, 3, 128), (2, 64, 128, 1, 128), (4, 32, 64, 9, 128), (2, 32, 128, 8, 256)]]


@pytest.mark.parametrize("geo", GEOS, ids=lambda g: f"b{g.bits}G{g.G}D{g.D}r{g.n_rep}BT{g.BT}")
def test_geometry_maps_are_bijective(geo):
    geo.validate()
    # key columns: each (p, h, g) its own column, owned by thread h % 4
    cols = {geo.k_col(p, h, g) for p in range(geo.P) for h in range(geo.NR) for g in range(geo.ng)}
    assert len(cols) == geo.P * geo.NR * geo.ng and max(cols) < geo.NK
    for p in range(geo.P):
        for h in range(geo.NR):
            for g in range(geo.ng):
                assert (geo.k_col(p, h, g) % 8) // 2 == h % 4  # owner thread c
    # value columns
    vcols = {geo.v_col(h // 4, gt, h % 4) for h in range(geo.NR) for gt in range(geo.ngc)}
    assert len(vcols) == geo.NR * geo.ngc and max(vcols) < geo.NV
    # V rows: a permutation of the channels; a thread's two rows are adjacent channels
    ch = [geo.v_channel(m) for m in range(geo.D)]
    assert sorted(ch) == list(range(geo.D))
    for m in range(0, geo.D, 16):
        for rr in range(8):
            assert geo.v_channel(m + rr + 8) == geo.v_channel(m + rr) + 1
    # Pexp: each (chunk, pair, column a, value column) its own slot of the buffer
    size = geo.NC * geo.half * 16 * geo.NV
    offs = np.array([geo.pexp_offset(ck, j, a, c) for ck in range(geo.NC) for j in range(geo.half)
                     for a in range(16) for c in range(geo.NV)])
    assert np.array_equal(np.sort(offs), np.arange(size))
    # every token of a chunk meets exactly one (pair, column a)
    rows = {geo.pexp_row(t) for t in range(geo.TC)}
    assert len(rows) == geo.TC == geo.half * 16
    # group slices cover each token group of the block once
    seen = np.zeros(geo.BT, int)
    for ck in range(geo.NC):
        for gt in range(geo.ngc):
            for mt, w in geo.group_slices(ck, gt):
                t0 = mt * geo.TM + w * 16 * geo.P
                assert ck * geo.TC + gt * geo.G <= t0 < ck * geo.TC + (gt + 1) * geo.G
                seen[t0:t0 + 16 * geo.P] += 1
    assert np.all(seen == 1)
    # Qexp meets every (head, channel, token of the row) once
    head, chan, fac = geo.qexp_tables
    hits = np.zeros((geo.P, geo.n_rep, geo.D), int)
    for s in range(geo.n_ksteps):
        for a in range(16):
            for col in range(geo.NK):
                if fac[s, a, col]:
                    p = [pp for pp in range(geo.P)
                         if any(geo.k_col(pp, head[s, a, col], g) == col for g in range(geo.ng))]
                    assert len(p) == 1
                    hits[p[0], head[s, a, col], chan[s, a, col]] += 1
    assert np.all(hits == 1)


@pytest.mark.parametrize("geo", GEOS, ids=lambda g: f"b{g.bits}G{g.G}D{g.D}r{g.n_rep}BT{g.BT}")
def test_wide_copy_boxes_move_the_same_bytes(geo):
    """Every block of every per-block array, copied as TMA does (a box of rows, zeros past
    the array), holds the same flat bytes in the wide view as in the cache's natural rows,
    also for a capacity that ends inside a block; the wide boxes are never narrower, stay
    within TMA's 256-element box row and 16-byte row multiple, and widen the 16-byte rows."""
    rng = np.random.default_rng(geo.BT + geo.D)
    for Tq in (8 * geo.BT, 8 * geo.BT - geo.G, 3 * geo.G):
        natural, wide = md.block_boxes(geo, Tq, False), md.block_boxes(geo, Tq, True)
        for (rn, wn), (rw, ww), dt in zip(natural, wide, md._BLOCK_DTYPES):
            item = np.dtype(dt).itemsize
            assert rn * wn == rw * ww and ww >= wn and ww <= 256 and ww * item % 16 == 0
            flat = rng.integers(1, 2**15, size=Tq * rn * wn // geo.BT).astype(np.int64)
            for i in range(-(-Tq // geo.BT)):
                got = []
                for rows, width in ((rn, wn), (rw, ww)):
                    view = flat.reshape(-1, width)
                    box = np.zeros((rows, width), np.int64)
                    part = view[i * rows:(i + 1) * rows]
                    box[:len(part)] = part
                    got.append(box.reshape(-1))
                np.testing.assert_array_equal(got[0], got[1])
    if geo.D == 128 and geo.bits == 2:  # the scales' 16-byte rows become wide ones
        assert md.block_boxes(geo, 8 * geo.BT, True)[1][1] * 2 >= 256


_QUERY_GEOS = [Geometry(2, 32, 128, 4, 128), Geometry(4, 64, 64, 3, 64),
               Geometry(2, 32, 128, 12, 128)]  # by default (CI time); the rest with -m slow


@pytest.mark.parametrize("geo", _QUERY_GEOS + [pytest.param(g, marks=pytest.mark.slow)
                                               for g in GEOS if g not in _QUERY_GEOS],
                         ids=lambda g: f"b{g.bits}G{g.G}D{g.D}r{g.n_rep}BT{g.BT}")
def test_query_kernel_equals_xla_operands(geo):
    """The one-launch query operands (interpret mode) equal query_operands: Qexp bit for
    bit (koff cancels the 128x offset only for exactly these bf16 values), koff and the
    query sums up to the order of their float32 sums (NK = 48 at 12 heads: padded tiles)."""
    from pallas_kernels.mgpu_query import query_operands_kernel
    qp = jax.random.normal(jax.random.PRNGKey(geo.D + geo.n_rep), (2, 3, geo.n_rep, geo.D)) * 3
    cfg = CacheConfig.innerq(bits=geo.bits, group_size=geo.G, capacity=1024)
    layer = KVCache.create(cfg, 1, 2, 3, geo.D).layer(0)  # its shapes (q' is given)
    lengths = jnp.asarray([700, 37], jnp.int32)
    qe_ref, kc_ref = md.query_operands(qp, geo)
    qe, kc, q_out, nq = query_operands_kernel(qp, geo, layer, lengths, cfg, interpret=True)
    assert qe.shape == qe_ref.shape and qe.dtype == jnp.bfloat16 and kc.shape == kc_ref.shape
    np.testing.assert_array_equal(np.asarray(qe, np.float32), np.asarray(qe_ref, np.float32))
    np.testing.assert_allclose(np.asarray(kc), np.asarray(kc_ref), rtol=2e-6, atol=2e-5)
    assert np.abs(np.asarray(kc)).max() > 1.0  # not vacuous: real sums
    np.testing.assert_array_equal(q_out, qp)  # q' passed through for the epilogue
    np.testing.assert_array_equal(nq, region_sizes(lengths, cfg).quantized)
    with pytest.raises(ValueError, match="does not match the geometry"):
        query_operands_kernel(qp[..., :16], geo, layer, lengths, cfg, interpret=True)


def test_geometry_rejects_bad_options():
    with pytest.raises(ValueError, match="block_tokens"):
        Geometry(2, 32, 128, 4, 96).validate()
    with pytest.raises(ValueError, match="group_size"):
        Geometry(4, 128, 128, 4, 128).validate()
    with pytest.raises(ValueError, match="bits"):
        Geometry(3, 32, 128, 4, 128).validate()


# ------------------------------------------------------------- block simulation
def _np(x, dtype=None):
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _simulated_programs(geo: Geometry, nq, operands, NS: int, bps: int, program):
    """Runs ``program(ops, b, h, s, pexp, xchg, blocks)`` for every program of the grid
    (sequence b, kv head h, split s) and gathers the partials it returns ((o_full, m_cols,
    l_cols), stored by blk.store_partials). ``pexp`` is poisoned, then cleared by
    blk.zero_fill as the kernel does; ``xchg`` starts NaN; ``blocks`` yields, per block of
    the split, (n_valid, the six arrays' blocks as TMA brings them: zeros past the array)."""
    arrays = [_np(x) for x in operands]
    B, H = arrays[0].shape[:2]
    BT, NV, D = geo.BT, geo.NV, geo.D
    # rows per block of each operand's view: a block's elements over the view's row width
    rows = [r * w // x.shape[-1] for (r, w), x in zip(md._block_specs(geo), arrays)]
    o_part = np.zeros((B, H, NS, D, NV), np.float32)
    ml_part = np.zeros((B, H, NS, 2, NV), np.float32)
    ops = simt.SimOps()

    def blocks(b, h, s):
        n = int(np.clip(int(nq[b]) - s * bps * BT, 0, bps * BT))
        for i in range(-(-n // BT)):
            g = s * bps + i
            out = []
            for x, r in zip(arrays, rows):
                part = x[b, h][g * r:(g + 1) * r]
                blk_ = np.zeros((r,) + x.shape[3:], x.dtype)
                blk_[:len(part)] = part
                out.append(blk_.reshape(-1))
            yield n - i * BT, out

    for b in range(B):
        for h in range(H):
            for s in range(NS):
                pexp = np.zeros(geo.NC * geo.half * 16 * NV, ml_dtypes.bfloat16)
                pexp[:] = 1  # poison: zero_fill must clear it
                blk.zero_fill(ops, pexp, pexp.size)
                xchg = np.full(geo.xchg_size, np.nan, np.float32)
                o_full, m_cols, l_cols = program(ops, b, h, s, pexp, xchg, blocks(b, h, s))
                o_out = np.zeros(D * NV, np.float32)
                ml_out = np.zeros(2 * NV, np.float32)
                blk.store_partials(ops, geo, o_full, m_cols, l_cols, o_out, ml_out)
                o_part[b, h, s] = o_out.reshape(D, NV)
                ml_part[b, h, s] = ml_out.reshape(2, NV)
    return o_part, ml_part


def _initial_state(geo: Geometry):
    """(o_full, m_cols, l_cols) at a program's start."""
    NV = geo.NV
    return (simt.Frag("wgmma", (geo.D, NV), np.zeros((geo.D, NV), np.float32)),
            simt.Frag("col", (NV,), np.full(NV, md.NEG, np.float32)),
            simt.Frag("col", (NV,), np.zeros(NV, np.float32)))


def _b_logical(geo: Geometry, buf, tile, ncols):
    """The logical [16, ncols] B operand of ``tile``, read through the kernel's swizzled
    offsets (what the wgmma reads)."""
    return np.array([[buf[geo.b_offset(tile, a, c, ncols)] for c in range(ncols)]
                     for a in range(16)], np.float32)


def simulate_kernel(geo: Geometry, nq, qexp, kconst, operands, NS: int, bps: int,
                    tail: str = "mask", chain_parts: int = 1, rescale: str = "block",
                    ops_log: list | None = None):
    """The kernel of mgpu_decode._kernel, program by program, with the simulator backend.

    Follows the Pallas body step for step: the same block functions, wgmma modelled as a
    float32 product (A from the register arrays, B the logical Qexp / the Pexp buffer read
    through the kernel's own swizzled offsets), the pipeline as a loop over blocks.
    """
    zero_tail = tail == "zero"
    qexp, kconst = _np(qexp, np.float32), _np(kconst, np.float32)

    def program(ops, b, h, s, pexp, xchg, blocks):
        kc = kconst[b, h].reshape(-1).astype(np.float32)
        o_full, m_cols, l_cols = _initial_state(geo)
        acc_init = blk.k_acc_init(ops, geo, kc)
        first = len(ops.branches)
        for n_valid, (kw_s, ks_s, kz_s, vw_s, vs_s, vz_s) in blocks:
            acc = acc_init
            for stp in md._parts(geo.k_steps, chain_parts):  # the kernel's parts
                if geo.e4m3:  # the hi and the lo table (K-major rows) against the same registers
                    for a, st in zip(blk.k_operands8(ops, geo, kw_s, stp), stp):
                        for half in range(2):
                            acc = simt.wgmma(acc, a, qexp[b, h, 2 * st + half].T)
                else:
                    for a, st in zip(blk.k_operands(ops, geo, kw_s, stp), stp):
                        acc = simt.wgmma(acc, a, qexp[b, h, st])
            m_new, l_cols, o_full, poffs, psums = blk.softmax_step(
                ops, geo, acc, ks_s, kz_s, kc, m_cols, l_cols, o_full, n_valid, xchg, pexp,
                tail=(vs_s, vz_s) if zero_tail else None, lazy=rescale == "lazy")
            for ck in range(geo.NC):
                acc_v = blk.v_acc_init(ops, geo, poffs[ck])
                for js in md._parts(geo.half, chain_parts):
                    a_v = blk.v_operands(ops, geo, vw_s, ck, js)
                    for a, j in zip(a_v, js):
                        acc_v = simt.wgmma(acc_v, a, _b_logical(geo, pexp, ck * geo.half + j,
                                                                 geo.NV))
                o_full = blk.v_epilogue(ops, geo, o_full, acc_v, vs_s, vz_s, psums[ck],
                                        None if zero_tail else n_valid, ck)
            m_cols = m_new
        if ops_log is not None:  # the program's lazy-rescale choices, block by block
            ops_log.append(ops.branches[first:])
        return o_full, m_cols, l_cols

    return _simulated_programs(geo, nq, operands, NS, bps, program)


def simulate_outer_kernel(geo: Geometry, nq, qtab, operands, NS: int, bps: int):
    """The OuterQ program of mgpu_decode._kernel with the simulator backend: per block the
    key operand Qexp and its column constants built by the threads
    (blk.outer_key_operand), the key chain read through the buffer's swizzled offsets, the
    OuterQ softmax step, the value chains and epilogue."""
    qtab = _np(qtab, np.float32)
    H = _np(operands[0]).shape[1]
    NK, NV = geo.NK, geo.NV

    def program(ops, b, h, s, pexp, xchg, blocks):
        qt = qtab[b * H + h].reshape(-1)
        qexp = np.zeros(geo.n_ksteps * 16 * NK, ml_dtypes.bfloat16)
        qexp[:] = 1  # poison: zero_fill must clear it
        blk.zero_fill(ops, qexp, qexp.size)
        kconst = np.zeros(2 * NK, np.float32)
        o_full, m_cols, l_cols = _initial_state(geo)
        for n_valid, (kw_s, ks_s, kz_s, vw_s, vs_s, vz_s) in blocks:
            blk.outer_key_operand(ops, geo, qt, ks_s, kz_s, qexp, kconst)
            acc = blk.k_acc_init(ops, geo, kconst)
            for st, a in enumerate(blk.k_operands(ops, geo, kw_s)):
                acc = simt.wgmma(acc, a, _b_logical(geo, qexp, st, NK))
            m_new, alpha, poffs, psum, zsum = blk.outer_softmax_step(
                ops, geo, acc, vs_s, vz_s, m_cols, n_valid, xchg, pexp)
            l_cols = simt.Frag("col", (NV,), l_cols.mat * alpha.mat + psum.mat)
            for ck in range(geo.NC):
                acc_v = blk.v_acc_init(ops, geo, poffs[ck])
                for j, a in enumerate(blk.v_operands(ops, geo, vw_s, ck)):
                    acc_v = simt.wgmma(acc_v, a, _b_logical(geo, pexp, ck * geo.half + j, NV))
                o_full = blk.outer_v_epilogue(ops, geo, o_full, acc_v,
                                              zsum if ck == 0 else None,
                                              alpha if ck == 0 else None)
            m_cols = m_new
        return o_full, m_cols, l_cols

    return _simulated_programs(geo, nq, operands, NS, bps, program)


def _simulated_attention(cache, qp, opts, merges=("xla",)):
    """The simulated kernel's partials merged with the windows, once per entry of
    ``merges``: in XLA (``"xla"``) or by the Triton epilogue in interpret mode
    (``"epilogue"``); a list, one output per merge."""
    cfg, layer = cache.config, cache.layer(0)
    B, H, r, D = qp.shape
    geo = Geometry(cfg.bits, cfg.group_size, D, r,
                   opts.get("block_tokens") or md.default_block_tokens(cfg.bits, cfg.group_size, D),
                   cfg.kind, opts.get("key_format", "bf16"))
    geo.validate()
    n_blocks = max(1, -(-cfg.quant_capacity // geo.BT))
    bps = -(-n_blocks // opts["num_splits"])
    NS = -(-n_blocks // bps)
    nq = np.asarray(region_sizes(cache.lengths, cfg).quantized)
    boxes = md.block_boxes(geo, cfg.quant_capacity, opts.get("wide_copies", False))
    operands = md.kernel_operands(layer, geo, boxes)
    if geo.outer:
        o_part, ml_part = simulate_outer_kernel(geo, nq, md.outer_query_table(qp, geo), operands,
                                                NS, bps)
    else:
        qexp, kconst = (md.query_operands8 if geo.e4m3 else md.query_operands)(qp, geo)
        o_part, ml_part = simulate_kernel(geo, nq, qexp, kconst, operands, NS, bps,
                                          opts.get("tail", "mask"), opts.get("chain_parts", 1),
                                          opts.get("rescale", "block"), opts.get("ops_log"))
    o_part, ml_part = jnp.asarray(o_part), jnp.asarray(ml_part)
    outs = []
    for merge in merges:
        if merge == "epilogue":
            outs.append(windows_and_merge(qp, layer, cache.lengths, cfg, o_part, ml_part, geo,
                                          interpret=True))
        else:
            window = md.window_partial(qp, layer, cache.lengths, cfg)
            outs.append(md.combine_partials(o_part, ml_part, window, geo))
    return outs


# the simulation runs in Python per lane: four cases by default (2 and 4 bits, G 32 and
# 64, D 64 and 128, GQA, no sinks), the rest of the grid with -m slow (CI time); the GPU
# module runs the whole grid compiled
_SIM_SLOW = {"innerq2-G64-D128-gqa4", "innerq2-G32-D64-smollm", "innerq2-G64-D128-mha",
             "innerq2-G32-D64-mha-bt256", "innerq4-G64-D128-gqa8", "recommended-D128-gqa4"}


_SIM_EPILOGUE = {"innerq2-G32-D128-gqa4", "innerq2-nosink"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SIM_SLOW
                                  else n for n in GRID])
def test_simulated_kernel_equals_reference(name):
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    # the XLA merge and, for two cases (CI time; test_epilogue_equals_xla_merge covers
    # the rest of the grid), windows="epilogue": the Triton epilogue in interpret mode
    merges = ("xla", "epilogue") if name in _SIM_EPILOGUE else ("xla",)
    for out in _simulated_attention(cache, qp, opts, merges):
        assert out.shape == ref.shape
        assert _rel(out, ref) < TOL
        empty = np.asarray(cache.lengths) == 0
        np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


def test_grid_exercises_regions():
    """The grid holds a sequence inside the sink, one with no quantized token, one with
    exactly one quantized group, and full ones spanning several blocks and splits."""
    cfg, D, _, Hkv, lengths, appends, _ = GRID["innerq2-G32-D128-gqa4"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    sizes = region_sizes(cache.lengths, cfg)
    nq = np.asarray(sizes.quantized)
    assert nq[1] == 0 and np.asarray(sizes.sink)[1] == 3
    assert nq[2] == 0 and np.asarray(sizes.recent)[2] > 0
    assert nq[3] == cfg.group_size
    assert nq[0] > 256 and nq[0] % 128  # several blocks, a partial last one
    pre = region_sizes(jnp.asarray(lengths) - appends, cfg).quantized
    assert nq[4] > int(pre[4])


def test_combine_merges_splits_like_one_softmax():
    """Random partials split at arbitrary points merge to the softmax over all of them."""
    rng = np.random.default_rng(0)
    geo = Geometry(2, 32, 128, 4, 128)
    B, H, NS, T = 2, 3, 4, 64
    s = rng.standard_normal((B, H, NS + 1, geo.n_rep, T)).astype(np.float32) * 3
    v = rng.standard_normal((B, H, NS + 1, T, geo.D)).astype(np.float32)
    m = s.max(-1)
    p = np.exp2(s - m[..., None])
    o = np.einsum("bhsrt,bhstd->bhsrd", p, v)
    lsum = p.sum(-1)
    cols, rows = geo.combine_tables
    o_part = np.zeros((B, H, NS, geo.D, geo.NV), np.float32)
    ml_part = np.zeros((B, H, NS, 2, geo.NV), np.float32)
    for hh in range(geo.n_rep):  # spread each head over its group columns
        share = rng.dirichlet(np.ones(geo.ngc))
        for gt in range(geo.ngc):
            o_part[..., rows, cols[hh, gt]] = o[:, :, :NS, hh] * share[gt]
            ml_part[:, :, :, 1, cols[hh, gt]] = lsum[:, :, :NS, hh] * share[gt]
            ml_part[:, :, :, 0, cols[hh, gt]] = m[:, :, :NS, hh]
    window = (o[:, :, NS], m[:, :, NS], lsum[:, :, NS])
    out = md.combine_partials(jnp.asarray(o_part), jnp.asarray(ml_part),
                              tuple(jnp.asarray(x) for x in window), geo)
    s_all = np.moveaxis(s, 2, 3).reshape(B, H, geo.n_rep, -1)
    v_all = v.reshape(B, H, -1, geo.D)
    w = np.exp2(s_all - s_all.max(-1, keepdims=True))
    ref = np.einsum("bhrt,bhtd->bhrd", w / w.sum(-1, keepdims=True), v_all)
    assert _rel(out, ref) < 1e-5


# names: 2 and 4 bits, G 32 and 64 (4 and 1 token groups per value chunk), D 64 and 128,
# 1, 3, 4 and 8 query heads per kv head, with and without sinks
_EPILOGUE_CASES = ["innerq2-G32-D128-gqa4", "innerq4-G64-D64-smollm", "innerq2-G64-D128-mha",
                   "innerq4-G64-D128-gqa8", "innerq2-nosink"]


def _random_partials(geo: Geometry, B, H, NS, rng, empty_splits=(), window_last=False):
    """Partials in the kernel's column order: each head's running max repeated over its
    token-group columns, sums and outputs random; every column no head owns (and every
    padding head's) is NaN, so a merge that used one would show it. Splits in
    ``empty_splits`` hold nothing (max NEG, sum 0, output 0), as the kernel leaves them.
    ``window_last``: the last split as the window program leaves its partial (max, sum and
    output in each head's first column only, NEG / 0 in its others), with the largest max."""
    o_part = np.full((B, H, NS, geo.D, geo.NV), np.nan, np.float32)
    ml_part = np.full((B, H, NS, 2, geo.NV), np.nan, np.float32)
    cols, rows = geo.combine_tables
    for hh in range(geo.n_rep):
        ml_part[:, :, :, 0, cols[hh]] = (rng.standard_normal((B, H, NS, 1)) * 4)
        ml_part[:, :, :, 1, cols[hh]] = rng.uniform(0.2, 3.0, (B, H, NS, len(cols[hh])))
        o_part[..., cols[hh]] = rng.standard_normal((B, H, NS, geo.D, len(cols[hh])))
    for s in empty_splits:
        ml_part[:, :, s, 0, cols] = md.NEG
        ml_part[:, :, s, 1, cols] = 0.0
        o_part[:, :, s][..., cols] = 0.0
    if window_last:
        ml_part[:, :, -1, 0, cols] = md.NEG
        ml_part[:, :, -1, 1, cols] = 0.0
        o_part[:, :, -1][..., cols] = 0.0
        top = np.nanmax(np.where(ml_part[:, :, :, 0] > md.NEG, ml_part[:, :, :, 0], -np.inf),
                        axis=(2, 3))
        for hh in range(geo.n_rep):
            c0 = cols[hh, 0]
            ml_part[:, :, -1, 0, c0] = top + rng.uniform(1.0, 4.0, (B, H))
            ml_part[:, :, -1, 1, c0] = rng.uniform(0.2, 3.0, (B, H))
            o_part[:, :, -1, :, c0] = rng.standard_normal((B, H, geo.D))
    return o_part, ml_part


# one case by default (4 bits, G 64, D 64, 3 heads per kv head; the simulated-kernel
# tests run the epilogue on 2 bits, G 32, D 128 and without sinks), the rest with -m slow
# (CI time: each interprets the kernel twice)
@pytest.mark.parametrize("name", [n if n == "innerq4-G64-D64-smollm"
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _EPILOGUE_CASES])
def test_epilogue_equals_xla_merge(name):
    """The Triton epilogue (interpret mode) gives the XLA windows and merge on random
    partials, uses no column outside the heads' own, and leaves empty sequences 0."""
    cfg, D, Hq, Hkv, lengths, appends, _ = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    layer = cache.layer(0)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    # 11 splits: a full merge step of 8 and a partial one; channel blocks of 16
    B, NS, n_dc = len(lengths), 11, D // 16
    o_part, ml_part = _random_partials(geo, B, Hkv, NS, np.random.default_rng(3),
                                       empty_splits=(1, 9))
    window = md.window_partial(qp, layer, cache.lengths, cfg)
    # the XLA merge reads only the heads' columns too, but NaN-free inputs keep it simple
    ref = md.combine_partials(jnp.asarray(np.nan_to_num(o_part)),
                              jnp.asarray(np.nan_to_num(ml_part)), window, geo)
    for blocks in (1, n_dc):
        out = windows_and_merge(qp, layer, cache.lengths, cfg, jnp.asarray(o_part),
                                jnp.asarray(ml_part), geo, n_channel_blocks=blocks,
                                interpret=True)
        assert out.shape == ref.shape
        assert _rel(out, ref) < 1e-5
    # a sequence that holds nothing (all splits empty, no window token) is exactly 0
    o0, ml0 = _random_partials(geo, B, Hkv, NS, np.random.default_rng(4),
                               empty_splits=range(NS))
    empty_cache = KVCache.create(cfg, 1, B, Hkv, D)
    out0 = windows_and_merge(qp, empty_cache.layer(0), empty_cache.lengths, cfg,
                             jnp.asarray(o0), jnp.asarray(ml0), geo, n_channel_blocks=n_dc,
                             interpret=True)
    np.testing.assert_array_equal(np.asarray(out0), 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_epilogue_finishes_rotated_values(signed):
    """finish_values: the epilogue undoes the value rotation (and the layer's signs) and casts,
    the last channel block's program of each (sequence, kv head) finishing the whole rows:
    the XLA windows, merge and finish_output on random partials, in f32 and in bf16."""
    from innerq_jax.reference import finish_output

    cfg, D, Hq, Hkv, lengths, appends, _ = GRID["recommended-D128-gqa4"]
    cfg = dataclasses.replace(cfg, rotation_signs=signed)  # H diag(s), or H alone
    assert cfg.rotate_values
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    layer = cache.layer(0)
    assert (layer.rot_signs is not None) == signed
    qp = _query(cache, Hq)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    B, NS = len(lengths), 5
    o_part, ml_part = _random_partials(geo, B, Hkv, NS, np.random.default_rng(8),
                                       empty_splits=(2,))
    window = md.window_partial(qp, layer, cache.lengths, cfg)
    merged = md.combine_partials(jnp.asarray(o_part), jnp.asarray(ml_part), window, geo)
    with jax.default_matmul_precision("highest"):
        ref = finish_output(merged, cfg, jnp.float32, layer.rot_signs).reshape(merged.shape)
    # the rotation mixes every channel: the finish is not the channels merged alone
    assert _rel(merged, ref) > 0.5
    for blocks, dtype, tol in ((1, jnp.float32, 1e-5), (D // 16, jnp.float32, 1e-5),
                               (D // 32, jnp.bfloat16, 1e-2)):
        out = windows_and_merge(qp, layer, cache.lengths, cfg, jnp.asarray(o_part),
                                jnp.asarray(ml_part), geo, n_channel_blocks=blocks,
                                out_dtype=dtype, finish_values=True, interpret=True)
        assert out.shape == ref.shape and out.dtype == dtype
        assert _rel(out.astype(jnp.float32), ref) < tol, (blocks, dtype)
    plain = CacheConfig.innerq(capacity=cfg.capacity)
    with pytest.raises(ValueError, match="rotates no values"):
        windows_and_merge(qp, layer, cache.lengths, plain, jnp.asarray(o_part),
                          jnp.asarray(ml_part), geo, finish_values=True, interpret=True)


def test_epilogue_rejects_mismatched_partials():
    cfg, D, Hq, Hkv, lengths, appends, _ = GRID["innerq2-nosink"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    o_part = jnp.ones((len(lengths), Hkv, 2, D, geo.NV + 16), jnp.float32)
    ml_part = jnp.ones((len(lengths), Hkv, 2, 2, geo.NV), jnp.float32)
    with pytest.raises(ValueError, match="value columns"):
        windows_and_merge(_query(cache, Hq), cache.layer(0), cache.lengths, cfg, o_part,
                          ml_part, geo, interpret=True)
    # more query heads per kv head than the window MMA's 16 rows: refused, naming the way out
    qp17 = jnp.ones((len(lengths), Hkv, 17, D), jnp.float32)
    with pytest.raises(ValueError, match="at most 16 query heads.*windows='xla'"):
        windows_and_merge(qp17, cache.layer(0), cache.lengths, cfg, o_part, ml_part, geo,
                          interpret=True)
    # channel blocks must be power-of-two blocks of at least 16 of the D = 64 channels
    o_ok = jnp.ones((len(lengths), Hkv, 2, D, geo.NV), jnp.float32)
    for bad in (0, 3, 8):
        with pytest.raises(ValueError, match="n_channel_blocks"):
            windows_and_merge(_query(cache, Hq), cache.layer(0), cache.lengths, cfg, o_ok,
                              ml_part, geo, n_channel_blocks=bad, interpret=True)


def test_epilogue_channel_blocks_fill_the_device():
    from pallas_kernels.mgpu_epilogue import channel_blocks
    assert channel_blocks(1, 8, 128, 132) == 8  # 64 programs (one per SM would be 16.5)
    assert channel_blocks(8, 8, 128, 132) == 4  # 256 programs, about two per SM
    assert channel_blocks(8, 3, 64, 132) == 4  # blocks of 16 channels at most
    assert channel_blocks(64, 8, 128, 132) == 1  # B x H already fills the device
    assert channel_blocks(1, 8, 128, None) == 1  # no SM count: one program per (b, h)


# ------------------------------------------------------------------ lowering
# the kernel's structural variants: copy pipeline, where the bf16 windows are computed,
# copy boxes, where the query operands are built
VARIANTS = {"emit-xla": dict(pipeline="emit", windows="xla", wide_copies=False, query="xla"),
            "emit-epilogue": dict(pipeline="emit", windows="epilogue", wide_copies=False,
                                  query="xla"),
            "emit-wide": dict(pipeline="emit", windows="xla", wide_copies=True, query="xla"),
            "epilogue-wide": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                                  query="xla"),
            "epilogue-query": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                                   query="kernel"),
            "bulk-kernel": dict(pipeline="bulk", windows="kernel", explicit_barriers=True,
                                wide_copies=False, query="xla"),
            # the window program in the kernel, the merge alone in the Triton launch after it
            "kernel-merge": dict(pipeline="emit", windows="kernel", wide_copies=True,
                                 query="kernel"),
            "tail-zero": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                              query="kernel", tail="zero"),
            "chain2": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                           query="kernel", chain_parts=2),
            # each chain one inline block: one fence and commit, descriptors rebuilt per block
            "inline": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                           query="kernel", wgmma="inline"),
            # the running maximum kept until a score passes it by mgpu_block.LAZY_RESCALE
            "lazy": dict(pipeline="emit", windows="epilogue", wide_copies=True, query="kernel",
                         explicit_barriers=True, rescale="lazy"),
            # the exact maximum every block (the default where no tuned entry gives "lazy":
            # on the H200 every variant above that leaves rescale open runs "lazy")
            "block-max": dict(pipeline="emit", windows="epilogue", wide_copies=True,
                              query="kernel", explicit_barriers=True, rescale="block")}


# the copy-box variants differ from their natural-box twins only in the copies' views, and
# the variants measured slower or level (bulk, windows in the kernel, tail zeroing, chain
# parts, inline chains) share the default's block code: one grid case by default, the rest
# with -m slow (CI time)
_LOWER_CASES = [pytest.param(n, v, marks=pytest.mark.slow)
                if v in ("emit-wide", "epilogue-wide", "kernel-merge", "tail-zero", "chain2",
                         "bulk-kernel", "inline", "lazy", "block-max")
                and n != "innerq2-G32-D128-gqa4"
                else (n, v) for v in VARIANTS for n in GRID]


@pytest.mark.parametrize("name,variant", _LOWER_CASES)
def test_kernel_lowers_to_mosaic_gpu(name, variant):
    """The whole kernel lowers to Mosaic GPU IR (layouts, shapes, copies, wgmma operand
    checks); compiling it to SASS needs the GPU."""
    cfg, D, Hq, Hkv, lengths, _, opts = GRID[name]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    kw = dict(opts, **VARIANTS[variant])
    f = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, **kw))
    if kw["windows"] in ("epilogue", "kernel"):  # Triton lowering needs an (abstract) H200
        n_triton = 1 + (kw.get("query") == "kernel")
        from jax.sharding import use_abstract_mesh
        with use_abstract_mesh(abstract_h200()):
            text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
        # the windows (epilogue) and the merge are the Triton call's: no einsum in XLA
        assert text.count("__gpu$xla.gpu.triton") == n_triton and "dot_general" not in text
    else:
        text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    # the code-pair unpack is one lop3 per register (two LOP3s each when written as & and |)
    assert "lop3.b32" in text
    # rescale="lazy": the block's test reduced by the exchange's barrier (bar.red.or)
    assert ("bar.red.or.pred" in text) == (kw.get("rescale") == "lazy")


@pytest.mark.parametrize("finish", ["xla", "kernel"])
def test_rotated_values_finish_where_asked(finish):
    """The op as the dispatch calls it (the model's bf16 query heads, ``prep``) on a cache that
    rotates its values: finish="xla" leaves the rotation to an XLA dot after the epilogue,
    finish="kernel" to the epilogue (the query and epilogue launches, no XLA dot)."""
    cfg, D, Hq, Hkv, lengths, _, opts = GRID["recommended-D128-gqa4"]
    assert cfg.rotate_values
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    q4 = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    prep = QueryPrep(1.0 / math.sqrt(D), "bfloat16")
    kw = dict(opts, **VARIANTS["epilogue-query"], finish=finish)
    f = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, prep=prep, **kw))
    from jax.sharding import use_abstract_mesh
    with use_abstract_mesh(abstract_h200()):
        traced = f.trace(q4, layer, lens)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert traced.out_info.dtype == jnp.bfloat16
    assert text.count("__gpu$xla.gpu.triton") == 2 and "mosaic_gpu" in text
    assert ("dot_general" in text) == (finish == "xla")


def test_rejects_bad_layouts_options_and_block():
    cfg = CacheConfig.outerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    qp = _query(cache, 1)
    # OuterQ needs one token per K row (2-bit D 64 packs two)
    with pytest.raises(ValueError, match="one token per K row"):
        md.mgpu_decode_attention(qp, cache.layer(0), cache.lengths, cfg, num_splits=1)
    cfg = CacheConfig.outerq(bits=4, capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    for bad in (dict(query="kernel"), dict(windows="kernel"), dict(tail="zero"),
                dict(chain_parts=2), dict(wgmma="inline"), dict(rescale="lazy")):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*OuterQ kernel takes"):
            md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                     num_splits=1, **bad)
    # a layer whose layout is not the config's
    inner = _cache(CacheConfig.innerq(bits=4, capacity=512), 1, 1, 64, [100])
    with pytest.raises(ValueError, match="OuterQ layout"):
        md.mgpu_decode_attention(_query(inner, 1), inner.layer(0), inner.lengths, cfg,
                                 num_splits=1)
    cfg = CacheConfig.innerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    with pytest.raises(ValueError, match="block_tokens"):
        md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                 num_splits=1, block_tokens=96)
    for bad in (dict(pipeline="tma"), dict(windows="cpu"), dict(query="numpy"),
                dict(wide_copies="yes"), dict(tail="clip"), dict(chain_parts=3),
                dict(wgmma="asm"), dict(ablate=("nothing",)), dict(finish="gpu"),
                dict(rescale="never")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                     num_splits=1, **bad)
    # the lazy maximum's stores come before the block's first barrier: it needs one per block
    with pytest.raises(ValueError, match="rescale='lazy' needs a barrier between blocks"):
        md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                 num_splits=1, rescale="lazy", explicit_barriers=False,
                                 pipeline="emit")
    # the finish in the kernel is the epilogue's
    with pytest.raises(ValueError, match="finish='kernel' is the epilogue's.*windows='xla'"):
        md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                 num_splits=1, finish="kernel", windows="xla")
    # prepare_call resolves every option, finish included: the device's tuned default
    # where none is given, the caller's otherwise
    prepared = md.prepare_call(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                               num_splits=1)
    assert prepared.finish == md.tuned_defaults().get("finish", "xla")
    assert prepared.windows == md.tuned_defaults().get("windows", "xla")
    prepared = md.prepare_call(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                               num_splits=1, windows="epilogue", finish="kernel")
    assert (prepared.windows, prepared.finish) == ("epilogue", "kernel")


# ------------------------------------------------------------ OuterQ (KIVI layout)
# The same kernel on the OuterQ layout (one token per K row: 2-bit D 128, 4-bit D 64 and
# 128). Lengths as in GRID: a partial last block, inside the sink, recent only, inside the
# first group.
OUTER_GRID = {
    "outerq2-G32-D128-gqa4": (CacheConfig.outerq(capacity=640), 128, 8, 2,
                              [630, 3, 140, 4 + 128 + 32 + 5, 197], 3, dict(num_splits=2)),
    "outerq2-G64-D128-gqa4": (CacheConfig.outerq(group_size=64, capacity=704), 128, 8, 2,
                              [700, 2, 100, 4 + 128 + 64 + 9], 2, dict(num_splits=3)),
    "outerq4-G32-D128-gqa4": (CacheConfig.outerq(bits=4, capacity=512), 128, 8, 2,
                              [505, 180, 1, 4 + 128 + 32 + 1], 0, dict(num_splits=2)),
    "outerq4-G64-D64-smollm": (CacheConfig.outerq(bits=4, group_size=64, recent=64,
                                                  capacity=512), 64, 9, 3, [500, 2, 200], 2,
                               dict(num_splits=2)),
    "outerq2-G64-D128-mha": (CacheConfig.outerq(group_size=64, capacity=512), 128, 2, 2,
                             [512, 250, 70], 3, dict(num_splits=1)),
    "outerq4-G64-D128-gqa8": (CacheConfig.outerq(bits=4, group_size=64, capacity=512), 128, 16,
                              2, [480, 230], 0, dict(num_splits=2)),
    "outerq2-nosink-bt256": (CacheConfig.outerq(sink=0, capacity=512), 128, 4, 1, [480, 33], 3,
                             dict(num_splits=1, block_tokens=256)),
}
# by default the 4-bit case (one value group per token); the 2-bit G 32 D 128 programs run
# by default in the sink and stale-scale tests below, the rest with -m slow (CI time)
_OUTER_SIM_FAST = ("outerq4-G64-D64-smollm",)


@pytest.mark.parametrize("name", [n if n in _OUTER_SIM_FAST else
                                  pytest.param(n, marks=pytest.mark.slow) for n in OUTER_GRID])
def test_simulated_outer_kernel_equals_reference(name):
    """The OuterQ program (per-block Qexp with the key scales folded in, Pexp with the value
    scales, each row's own group column) simulated over whole programs, merged by XLA and
    by the Triton epilogue in interpret mode, against the OuterQ reference."""
    cfg, D, Hq, Hkv, lengths, appends, opts = OUTER_GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    for out in _simulated_attention(cache, qp, opts, ("xla", "epilogue")):
        assert out.shape == ref.shape
        assert _rel(out, ref) < TOL
        empty = np.asarray(cache.lengths) == 0
        np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


def test_simulated_outer_kernel_with_sinks_equals_reference():
    """OuterQ with attention sinks (``CacheConfig.outerq(sink=4)``, the 2-bit quality pick
    on SmolLM2), which the dispatch runs on this kernel at long contexts: lengths inside the
    sink, at its edge and past it, merged by the Triton epilogue in interpret mode."""
    cfg = CacheConfig.outerq(sink=4, capacity=512)
    cache = _cache(cfg, 4, 2, 128, [3, 4, 4 + 128 + 32 + 7, 500], 2)
    qp = _query(cache, 8)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    (out,) = _simulated_attention(cache, qp, dict(num_splits=2), ("epilogue",))
    assert _rel(out, ref) < TOL


def test_simulated_outer_kernel_ignores_stale_scales_past_the_quantized_tokens():
    """Key scales / zeros of token groups and value scales / zeros of tokens past a
    sequence's quantized tokens (NaN here) never reach the output: the key columns they fill
    are no valid token's, the value ones are read as zeros."""
    cfg, D, Hq, Hkv, lengths, appends, opts = OUTER_GRID["outerq2-G32-D128-gqa4"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    layer = cache.layer(0)
    ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
    nq = np.asarray(region_sizes(cache.lengths, cfg).quantized)
    assert (nq % 128 != 0).any() and (nq == 0).any()
    kg = np.arange(layer.k.scale.shape[2]) * cfg.group_size  # key groups: first token
    vt = np.arange(layer.v.scale.shape[2])  # value scales: one row per token
    kdead = (kg[None, :] >= nq[:, None])[:, None, :, None]
    vdead = (vt[None, :] >= nq[:, None])[:, None, :, None]
    # the poison lands: dead slots in every sequence but the full one, live ones elsewhere
    assert kdead.any() and vdead.any() and not kdead.all() and not vdead.all()
    poison = lambda x, dead: jnp.where(dead, jnp.nan, x).astype(x.dtype)  # noqa: E731
    k = dataclasses.replace(layer.k, scale=poison(layer.k.scale, kdead),
                            zero=poison(layer.k.zero, kdead))
    v = dataclasses.replace(layer.v, scale=poison(layer.v.scale, vdead),
                            zero=poison(layer.v.zero, vdead))
    stale = dataclasses.replace(cache, layers=(dataclasses.replace(layer, k=k, v=v),))
    (out,) = _simulated_attention(stale, qp, opts)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("windows", ["xla", "epilogue"])
def test_outer_kernel_lowers_to_mosaic_gpu(windows):
    cfg, D, Hq, Hkv, lengths, _, opts = OUTER_GRID["outerq2-G32-D128-gqa4"]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, windows=windows,
                                                           wide_copies=True, **opts))
    from jax.sharding import use_abstract_mesh
    with use_abstract_mesh(abstract_h200()):
        text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "lop3.b32" in text
    assert text.count("__gpu$xla.gpu.triton") == (windows == "epilogue")


# ------------------------------------------------------------------------ GPU
def _hopper():
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    cc = getattr(devs[0], "compute_capability", "0") if devs else "0"
    return devs[0] if devs and cc.startswith("9") else None


@functools.lru_cache(maxsize=4)
def _gpu_case(name):
    """(cache, qp, reference) of a grid entry, built once for all variants."""
    cfg, D, Hq, Hkv, lengths, appends, _ = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    return cache, qp, quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(GRID))
def test_gpu_kernel_equals_reference(name, variant):
    """The compiled kernel, in each structural variant, against the reference."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): Mosaic GPU's CPU interpreter cannot run "
                    "pipelined copies, so the kernel runs only there")
    cfg, _, _, _, _, _, opts = GRID[name]
    cache, qp, ref = _gpu_case(name)
    kw = dict(opts, **VARIANTS[variant])
    out = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, **kw))(
        qp, cache.layer(0), cache.lengths)
    err = _rel(out, ref)
    print(f"{name} {variant}: rel err {err:.2e}")
    assert err < TOL
    empty = np.asarray(cache.lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("windows", ["epilogue", "xla"])
@pytest.mark.parametrize("name", list(OUTER_GRID))
def test_gpu_outer_kernel_equals_reference(name, windows):
    """The compiled kernel on the OuterQ layout against the OuterQ reference."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): Mosaic GPU's CPU interpreter cannot run "
                    "pipelined copies, so the kernel runs only there")
    cfg, D, Hq, Hkv, lengths, appends, opts = OUTER_GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    kw = dict(opts, windows=windows, wide_copies=True)
    out = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, **kw))(
        qp, cache.layer(0), cache.lengths)
    err = _rel(out, ref)
    print(f"{name} {windows}: rel err {err:.2e}")
    assert err < TOL
    empty = np.asarray(cache.lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name,finish", [("innerq2-G32-D128-gqa4", None),
                                         ("recommended-D128-gqa4", None),
                                         ("recommended-D128-gqa4", "kernel"),
                                         ("innerq2-G32-D64-smollm", None),
                                         ("outerq2-G32-D128-gqa4", None)])
def test_gpu_kernel_prepares_the_model_query(name, finish):
    """The compiled op as the dispatch calls it (the device's tuned variant): the model's
    bf16 query heads in, q' prepared by the query kernel (by XLA for OuterQ), the model's
    output back in bf16; for the recommended cache also with its value rotation undone in
    the epilogue (``finish="kernel"``)."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): Mosaic GPU's CPU interpreter cannot run "
                    "pipelined copies, so the kernel runs only there")
    from innerq_jax.attention import decode_attention_layer
    from innerq_jax.reference import split_heads

    cfg, D, Hq, Hkv, lengths, appends, opts = {**GRID, **OUTER_GRID}[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    layer = cache.layer(0)
    q = (jax.random.normal(jax.random.PRNGKey(7), (len(lengths), Hq, D)) * 2).astype(
        jnp.bfloat16)
    prep = QueryPrep.of(q, 1.0 / math.sqrt(D))
    opts = dict(opts, **({"finish": finish} if finish else {}))
    out = jax.jit(lambda q_, lay, n: md.mgpu_decode_attention(q_, lay, n, cfg, prep=prep,
                                                              **opts))(
        split_heads(q, Hkv), layer, cache.lengths)
    assert out.dtype == jnp.bfloat16
    with jax.default_matmul_precision("highest"):
        ref = decode_attention_layer(q.astype(jnp.float32), layer, cache.lengths, cfg,
                                     backend="reference")
    err = _rel(out.reshape(ref.shape), ref)
    print(f"{name} prepared: rel err {err:.2e}")
    assert err < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kind,B,T", [("innerq", 8, 16384), ("recommended", 8, 16384),
                                      ("outerq-sinks", 8, 16384), ("innerq", 1, 131072)])
def test_gpu_dispatch_runs_the_tuned_mosaic_kernel(kind, B, T):
    """The layer's attention at shapes the H200's tuned entry sends to the Mosaic kernel (64
    (sequence, kv head) pairs and a 16k-token cache, ragged lengths: full, inside the sink,
    recent only, mid-block, one group; OuterQ here with 4 sink tokens, which its published
    layout leaves out; and one sequence of a 128k-token cache, ~50 splits per pair), with
    the model's bf16 query heads, against the reference."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): Mosaic GPU's CPU interpreter cannot run "
                    "pipelined copies, so the kernel runs only there")
    from innerq_jax.attention import decode_attention_layer, quantized_path

    make = {"innerq": CacheConfig.innerq, "recommended": CacheConfig.recommended,
            "outerq-sinks": functools.partial(CacheConfig.outerq, sink=4)}[kind]
    cfg = make(capacity=T)
    Hkv, Hq, D = 8, 32, 128
    assert quantized_path(cfg, B * Hkv, "pallas", head_dim=D) == "mosaic"
    lengths = (np.array([16384, 3, 100, 9001, 4 + 128 + 32 + 5, 15000, 2048 + 77, 700])
               if B == 8 else np.array([T - 37]))
    kk, kv, kq = jax.random.split(jax.random.PRNGKey(11), 3)
    chan = 1.0 + 7.0 * (jax.random.uniform(kk, (D,)) > 0.97)  # a few outlier channels
    k = (jax.random.normal(kk, (1, B, Hkv, T, D)) + 1.5) * chan
    v = jax.random.normal(kv, (1, B, Hkv, T, D))
    cache = KVCache.from_prefill(cfg, k, v, jnp.asarray(lengths, jnp.int32))
    layer = cache.layer(0)
    q = (jax.random.normal(kq, (B, Hq, D)) * 2).astype(jnp.bfloat16)
    out = jax.jit(lambda q_, lay, n: decode_attention_layer(q_, lay, n, cfg, backend="pallas"))(
        q, layer, cache.lengths)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    with jax.default_matmul_precision("highest"):
        ref = decode_attention_layer(q.astype(jnp.float32), layer, cache.lengths, cfg,
                                     backend="reference")
    err = _rel(out, ref)
    print(f"{kind} through the dispatch: rel err {err:.2e}")
    assert err < TOL


class _Device:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


def test_dispatch_prefers_mosaic_only_where_measured():
    cfg = CacheConfig.innerq(capacity=512)
    h200 = _Device("gpu", "NVIDIA H200")
    assert not md.preferred(cfg, device=_Device("cpu", "cpu"))
    assert not md.preferred(CacheConfig.outerq(capacity=512), device=h200)
    assert not md.preferred(CacheConfig.bf16(capacity=512), device=h200)
    assert not md.preferred(cfg, {"num_warps": 4}, device=h200)  # a Triton-only option
    assert not md.preferred(cfg, device=_Device("gpu", "an unmeasured GPU"))
    # the H200's rule: at least 2**20 cache tokens over all (sequence, kv head) pairs
    assert md.TUNED["NVIDIA H200"]["preferred"] == dict(min_pair_tokens=1 << 20)
    long = CacheConfig.innerq(capacity=32768)
    assert md.preferred(long, {"num_stages": 4}, h200, pairs=64)
    assert md.preferred(CacheConfig.innerq(capacity=16384), device=h200, pairs=256)
    assert md.preferred(CacheConfig.innerq(capacity=131072), device=h200, pairs=8)  # B 1 / 128k
    assert md.preferred(long, device=h200, pairs=32)  # B 4 x 8 kv heads at 32k: 2**20
    assert not md.preferred(long, device=h200, pairs=8)  # B 1 / 32k: Triton
    assert not md.preferred(CacheConfig.innerq(capacity=65536), device=h200, pairs=8)
    assert not md.preferred(cfg, device=h200, pairs=256)  # a 512-token cache: Triton
    assert not md.preferred(long, device=h200)  # no shape given: Triton
    assert not md.preferred(long, {"num_warps": 4}, h200, pairs=64)
    # OuterQ: from 2**19 pair-tokens, and only a geometry the kernel takes (one token per
    # key row)
    assert md.TUNED["NVIDIA H200"]["preferred_outerq"] == dict(min_pair_tokens=1 << 19)
    outer = CacheConfig.outerq(capacity=32768)
    assert md.preferred(outer, device=h200, pairs=64, head_dim=128)
    assert md.preferred(CacheConfig.outerq(capacity=65536), device=h200, pairs=8, head_dim=128)
    assert not md.preferred(outer, device=h200, pairs=64)  # no head_dim: Triton
    assert not md.preferred(outer, device=h200, pairs=64, head_dim=64)  # 2-bit D 64
    assert md.preferred(CacheConfig.outerq(bits=4, capacity=32768), device=h200, pairs=64,
                        head_dim=64)
    assert not md.preferred(outer, device=h200, pairs=8, head_dim=128)


def test_dispatch_runs_the_kernel_the_rule_picks(monkeypatch):
    """decode_attention_layer on a GPU-looking device runs the Mosaic op exactly where the
    tuned rule says, with the call's batch x kv heads (stand-in kernels record the choice)."""
    import innerq_jax.attention as att

    picked = []
    monkeypatch.setattr(att, "_default_backend", lambda: "pallas")
    monkeypatch.setattr(md, "mgpu_decode_attention",
                        lambda qp, *a, **k: picked.append("mosaic") or jnp.zeros(qp.shape))
    monkeypatch.setattr(att, "_fused_kernel", lambda: (
        lambda qp, *a, **k: picked.append("triton") or jnp.zeros(qp.shape)))
    h200 = _Device("gpu", "NVIDIA H200")
    monkeypatch.setattr(md.jax, "devices", lambda *a: [h200])
    cfg = CacheConfig.innerq(capacity=16384)
    for B, Hkv, want in ((8, 8, "mosaic"), (1, 8, "triton"), (8, 4, "triton")):
        layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, 64).layer(0))
        q = jax.ShapeDtypeStruct((B, 4 * Hkv, 64), jnp.float32)
        lens = jax.ShapeDtypeStruct((B,), jnp.int32)
        jax.eval_shape(lambda q_, lay, n: att.decode_attention_layer(q_, lay, n, cfg), q,
                       layer, lens)
        assert picked[-1] == want, (B, Hkv, picked)
        # the same choice, named, as benchmarks read it
        assert att.quantized_path(cfg, B * Hkv) == want
    outer = CacheConfig.outerq(capacity=16384)
    for B, Hkv, D, want in ((8, 8, 128, "mosaic"), (1, 8, 128, "triton"), (8, 8, 64, "triton")):
        layer = jax.eval_shape(lambda: KVCache.create(outer, 1, B, Hkv, D).layer(0))
        q = jax.ShapeDtypeStruct((B, 4 * Hkv, D), jnp.float32)
        lens = jax.ShapeDtypeStruct((B,), jnp.int32)
        jax.eval_shape(lambda q_, lay, n: att.decode_attention_layer(q_, lay, n, outer), q,
                       layer, lens)
        assert picked[-1] == want, (B, Hkv, D, picked)
        assert att.quantized_path(outer, B * Hkv, head_dim=D) == want
    assert att.quantized_path(cfg, 64, "reference") == "reference"
    assert att.quantized_path(cfg, 64, "interpret") == "interpret"
    assert att.quantized_path(cfg, 64, kernel_options={"num_warps": 4}) == "triton"


# ------------------------------------------------------------- window program
def simulate_windows(geo: Geometry, cache, qp):
    """The kernel's window program (mgpu_block.window_attention) per (sequence, kv head)."""
    cfg, layer = cache.config, cache.layer(0)
    qw, valid = md.window_operands(qp, layer, cache.lengths, cfg)
    qw, valid = np.asarray(qw, np.float32), np.asarray(valid, np.int32)
    B, H = qw.shape[:2]
    bf = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)  # noqa: E731
    sk, sv, rk, rv = bf(layer.sink_k), bf(layer.sink_v), bf(layer.recent_k), bf(layer.recent_v)
    n_win = cfg.sink + cfg.window
    ops = simt.SimOps()
    o_part = np.zeros((B, H, 1, geo.D, geo.NV), np.float32)
    ml_part = np.zeros((B, H, 1, 2, geo.NV), np.float32)
    for b in range(B):
        for h in range(H):
            wins = [(sk[b, h].reshape(-1), sv[b, h].reshape(-1), cfg.sink)] if cfg.sink else []
            wins.append((rk[b, h].reshape(-1), rv[b, h].reshape(-1), cfg.window))
            scr = np.full(blk.window_scratch_size(geo, n_win), np.nan, np.float32)
            o_out = np.full(geo.D * geo.NV, np.nan, np.float32)  # poison: every entry written
            ml_out = np.full(2 * geo.NV, np.nan, np.float32)
            blk.window_attention(ops, geo, qw[b, h], wins, valid[b], scr, o_out, ml_out)
            o_part[b, h, 0] = o_out.reshape(geo.D, geo.NV)
            ml_part[b, h, 0] = ml_out.reshape(2, geo.NV)
    return o_part, ml_part


# windows="kernel" is an option measured slower (KERNEL_NOTES.md, round 9): one case by
# default, the rest with -m slow (CI time)
@pytest.mark.parametrize("name", ["innerq2-G32-D128-gqa4",
                                  pytest.param("innerq4-G64-D64-smollm", marks=pytest.mark.slow),
                                  pytest.param("innerq2-nosink", marks=pytest.mark.slow)])
def test_simulated_window_program_equals_xla(name):
    """The in-kernel window program (windows="kernel") gives the XLA window partial."""
    cfg, D, Hq, Hkv, lengths, appends, _ = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    o_part, ml_part = simulate_windows(geo, cache, qp)
    assert np.all(np.isfinite(o_part)) and np.all(np.isfinite(ml_part))
    window = md.window_partial(qp, cache.layer(0), cache.lengths, cfg)
    o_w, m_w, l_w = (np.asarray(x) for x in window)
    cols, rows = geo.combine_tables
    np.testing.assert_allclose(ml_part[:, :, 0, 0][..., cols[:, 0]], m_w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ml_part[:, :, 0, 1][..., cols].sum(-1), l_w, rtol=1e-5, atol=1e-6)
    o_k = np.swapaxes(o_part[:, :, 0][:, :, rows][..., cols].sum(-1), -1, -2)
    assert _rel(o_k, o_w) < 1e-5
    # merged with nothing else it is the attention over the windows alone
    out = md.combine_partials(jnp.asarray(o_part), jnp.asarray(ml_part), None, geo)
    ref = np.where(l_w[..., None] > 0, o_w / np.maximum(l_w, 1e-30)[..., None], 0.0)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["innerq2-G64-D128-gqa4", "innerq2-nosink"])
def test_simulated_kernel_with_window_program_equals_reference(name):
    """windows="kernel": the window program's partial is one more split of the merge."""
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    layer = cache.layer(0)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv,
                   opts.get("block_tokens") or md.default_block_tokens(cfg.bits, cfg.group_size, D))
    n_blocks = -(-cfg.quant_capacity // geo.BT)
    bps = -(-n_blocks // opts["num_splits"])
    nq = np.asarray(region_sizes(cache.lengths, cfg).quantized)
    qexp, kconst = md.query_operands(qp, geo)
    o_q, ml_q = simulate_kernel(geo, nq, qexp, kconst, md.kernel_operands(layer, geo),
                                -(-n_blocks // bps), bps)
    o_w, ml_w = simulate_windows(geo, cache, qp)
    o_all = jnp.asarray(np.concatenate([o_q, o_w], 2))
    ml_all = jnp.asarray(np.concatenate([ml_q, ml_w], 2))
    ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
    # merged in XLA, and by the one-launch merge the op runs (Triton, interpret mode)
    for out in (md.combine_partials(o_all, ml_all, None, geo),
                merge_partials(o_all, ml_all, geo, Hq // Hkv, interpret=True)):
        assert out.shape == ref.shape
        assert _rel(out, ref) < TOL


@pytest.mark.parametrize("name", ["innerq2-G32-D128-gqa4",
                                  pytest.param("innerq4-G64-D128-gqa8", marks=pytest.mark.slow)])
def test_merge_equals_xla_merge(name):
    """The merge-only launch (windows="kernel") gives the XLA merge on random partials
    (NaN in every column no head owns; the last split also as the window program leaves
    it, its max above every other split's), with 1 and D/16 channel blocks; a sequence
    whose splits all hold nothing is exactly 0."""
    cfg, D, Hq, Hkv, lengths, _, _ = GRID[name]
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    B, NS = len(lengths), 11  # a full merge step of 8 and a partial one
    for window_last in (False, True):  # the last split as the window program leaves it
        o_part, ml_part = _random_partials(geo, B, Hkv, NS, np.random.default_rng(7),
                                           empty_splits=(0, 9), window_last=window_last)
        ref = md.combine_partials(jnp.asarray(np.nan_to_num(o_part)),
                                  jnp.asarray(np.nan_to_num(ml_part)), None, geo)
        for blocks in (1, D // 16):
            out = merge_partials(jnp.asarray(o_part), jnp.asarray(ml_part), geo, Hq // Hkv,
                                 n_channel_blocks=blocks, interpret=True)
            assert out.shape == ref.shape == (B, Hkv, Hq // Hkv, D)
            assert _rel(out, ref) < 1e-5
    o0, ml0 = _random_partials(geo, B, Hkv, NS, np.random.default_rng(8), empty_splits=range(NS))
    out0 = merge_partials(jnp.asarray(o0), jnp.asarray(ml0), geo, Hq // Hkv, interpret=True)
    np.testing.assert_array_equal(np.asarray(out0), 0.0)
    with pytest.raises(ValueError, match="value columns"):
        merge_partials(jnp.asarray(o_part[..., :-1]), jnp.asarray(ml_part), geo, Hq // Hkv,
                       interpret=True)
    with pytest.raises(ValueError, match="n_channel_blocks"):
        merge_partials(jnp.asarray(o_part), jnp.asarray(ml_part), geo, Hq // Hkv,
                       n_channel_blocks=3, interpret=True)


def test_merge_takes_column_counts_not_a_power_of_two():
    """12 query heads per kv head: 48 value columns, which the merge's tiles pad to 64 (the
    padding never read as a head's); the XLA merge again, the window program's last split
    among the partials."""
    geo = Geometry(2, 32, 128, 12, 128)
    assert geo.NV == 48
    o_part, ml_part = _random_partials(geo, 2, 2, 11, np.random.default_rng(5),
                                       empty_splits=(2,), window_last=True)
    ref = md.combine_partials(jnp.asarray(np.nan_to_num(o_part)),
                              jnp.asarray(np.nan_to_num(ml_part)), None, geo)
    out = merge_partials(jnp.asarray(o_part), jnp.asarray(ml_part), geo, 12,
                         n_channel_blocks=8, interpret=True)
    assert out.shape == ref.shape == (2, 2, 12, 128)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["innerq2-G32-D128-gqa4",
                                  pytest.param("innerq4-G64-D64-smollm", marks=pytest.mark.slow)])
def test_simulated_kernel_lazy_rescale_equals_reference(name):
    """rescale="lazy": each program's first block takes the exact side (its running maximum
    starts at NEG), later blocks of these caches keep the maximum, and the partials merge to
    the reference as closely as the exact maximum's do."""
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    log = []
    (lazy,) = _simulated_attention(cache, qp, dict(opts, rescale="lazy", ops_log=log))
    (exact,) = _simulated_attention(cache, qp, opts)
    err, err_exact = _rel(lazy, ref), _rel(exact, ref)
    assert err < TOL and err < 1.5 * err_exact, (err, err_exact)
    runs = [r for r in log if r]  # one list per program that had blocks
    assert runs and all(r[0] for r in runs), log
    assert any(not x for r in runs for x in r[1:]), log


def test_tuned_lazy_rescale_only_where_a_barrier_ends_each_block(monkeypatch):
    """The H200's tuned default (rescale="lazy") applies where each block ends in a barrier
    (explicit barriers, or the bulk pipeline); without one the kernel keeps the exact
    maximum, and only an explicit rescale="lazy" there is an error (test above)."""
    monkeypatch.setattr(md, "tuned_defaults", lambda device=None: dict(md.TUNED["NVIDIA H200"]))
    cfg, D, Hq, Hkv, lengths, _, _ = GRID["innerq2-G32-D128-gqa4"]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    for kw, lazy in ((dict(), True), (dict(explicit_barriers=False), False),
                     (dict(explicit_barriers=False, pipeline="bulk"), True)):
        f = jax.jit(lambda q, lay, n, kw=kw: md.mgpu_decode_attention(
            q, lay, n, cfg, num_splits=2, windows="xla", query="xla", **kw))
        text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
        assert ("bar.red.or.pred" in text) == lazy, kw


def test_simulated_lazy_rescale_takes_the_exact_side_when_scores_jump():
    """A block whose scores pass the kept maximum by more than LAZY_RESCALE (keys from token
    420 on shifted along the query's direction: about 40 log2 units higher) takes the exact
    side mid-program, and the output still equals the reference; with probabilities of up to
    2**LAZY_RESCALE nothing overflows."""
    cfg = CacheConfig.innerq(capacity=640)
    B, Hkv, Hq, D, T = 1, 2, 8, 128, 630
    rng = np.random.default_rng(5)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    k = rng.standard_normal((1, B, Hkv, T, D))
    v = rng.standard_normal((1, B, Hkv, T, D))
    k[..., 420:, :] += 40.0 * u
    cache = KVCache.from_prefill(cfg, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                 np.array([T]))
    q = jnp.asarray(np.broadcast_to(8.0 * u, (B, Hq, D)), jnp.float32)
    qp = prepare_query(q, cache.layer(0), cfg, 1.0 / math.sqrt(D))
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    log = []
    (out,) = _simulated_attention(cache, qp, dict(num_splits=1, rescale="lazy", ops_log=log))
    assert _rel(out, ref) < TOL
    # a block kept the maximum, and a later one took the exact side again
    assert any(not a and b for r in log for a, b in zip(r, r[1:])), log


@pytest.mark.parametrize("parts", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_simulated_kernel_in_chain_parts_equals_reference(parts):
    """chain_parts: the key and value chains in parts, each part's A operands unpacked
    alone (the same registers, fewer at once) give the reference; the operand subsets are
    exactly the full chain's."""
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID["innerq2-G32-D128-gqa4"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    (out,) = _simulated_attention(cache, qp, dict(opts, chain_parts=parts))
    assert _rel(out, ref) < TOL
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // Hkv, 128)
    rng = np.random.default_rng(11)
    words = lambda n: rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)  # noqa: E731
    kw, vw = words(64 * geo.MT * geo.KW), words(8 * geo.NC * geo.D)  # a block's words
    ops, ck = simt.SimOps(), geo.NC - 1
    full_k, full_v = blk.k_operands(ops, geo, kw), blk.v_operands(ops, geo, vw, ck)
    for stp in md._parts(geo.n_ksteps, parts):
        for a, st in zip(blk.k_operands(ops, geo, kw, stp), stp):
            np.testing.assert_array_equal(a.mat, full_k[st].mat)
    for js in md._parts(geo.half, parts):
        for a, j in zip(blk.v_operands(ops, geo, vw, ck, js), js):
            np.testing.assert_array_equal(a.mat, full_v[j].mat)


def test_simulated_kernel_ignores_stale_values_past_the_quantized_tokens():
    """Value scales and zero-points past a sequence's quantized tokens (slots an earlier,
    longer sequence may have left; NaN here) never reach the output, whether the kernel
    masks them in every block (tail="mask") or zeroes its last block's dead groups in
    shared memory (tail="zero", mgpu_block.zero_tail_groups)."""
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID["innerq2-G32-D128-gqa4"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    layer = cache.layer(0)
    ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
    nq = np.asarray(region_sizes(cache.lengths, cfg).quantized)
    groups = np.arange(layer.v.scale.shape[2])
    dead = (groups[None, :] * cfg.group_size >= nq[:, None])[:, None, :, None]
    # some sequence's quantized tokens end inside a kernel block, and one holds none
    assert (nq % 128 != 0).any() and (nq == 0).any() and not dead.all()
    poison = lambda x: jnp.where(dead, jnp.nan, x).astype(x.dtype)  # noqa: E731
    v = dataclasses.replace(layer.v, scale=poison(layer.v.scale), zero=poison(layer.v.zero))
    stale = dataclasses.replace(cache, layers=(dataclasses.replace(layer, v=v),))
    for tail in md.TAIL:
        (out,) = _simulated_attention(stale, qp, dict(opts, tail=tail))
        assert _rel(out, ref) < TOL


def test_simulated_kernel_agrees_with_reference_on_non_finite_keys():
    """NaN in a sink key, a recent key or a quantized group, Inf in a quantized value:
    NaN exactly where the reference has it (never a silent zero from the combine)."""
    cfg = CacheConfig.innerq(sink=4, capacity=512)
    rng = np.random.default_rng(5)
    k, v = _kv(rng, 3, 2, 400, 64)
    k[0, 0, 0, 1, 5] = np.nan  # sink of sequence 0, kv head 0
    k[0, 1, 1, 290, 7] = np.nan  # recent window of sequence 1, kv head 1
    v[0, 2, 0, 40, 3] = np.inf  # a quantized value group of sequence 2, kv head 0
    k[0, 2, 1, 60, 9] = np.nan  # a quantized key group of sequence 2, kv head 1
    cache = KVCache.from_prefill(cfg, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                 np.array([400, 300, 250]))
    qp = _query(cache, 4)
    ref = np.asarray(quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg))
    bad = ~np.isfinite(ref)
    assert bad[0, 0].all() and bad[1, 1].all() and bad[2, 1].all() and bad[2, 0, :, 3].all()
    for out in _simulated_attention(cache, qp, dict(num_splits=2), ("xla", "epilogue")):
        out = np.asarray(out)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(~np.isfinite(out), bad)
        assert _rel(out[~bad], ref[~bad]) < TOL


# ------------------------------------------------ e4m3 key operands (key_format="e4m3x2")
# The key chain's codes as e4m3 A registers (four per register) against the query table
# split into an e4m3 hi and lo part, two wgmmas per 32 channels into one accumulator.
_E4M3_GRID = [n for n in GRID if GRID[n][0].bits == 2]
_E4M3_SIM = ("innerq2-G32-D128-gqa4", "innerq2-G32-D64-smollm")  # by default (CI time)


def test_e4m3_unpack_matches_numpy():
    """Each level of the e4m3 unpack (one shift, one lop3 with 0x50) gives 8 + code or
    8 + 2 code of code 4b + i in byte b, exactly, and the kernel's own expression
    (blk.k_operands8 through the simulator) builds those registers."""
    from pallas_kernels.mgpu_geometry import E4M3_FAC, unpack_e4m3_reference
    rng = np.random.default_rng(8)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    codes = (words[:, None].astype(np.int64) >> (2 * np.arange(16))) & 3
    for i in range(4):
        got = unpack_e4m3_reference(words, i)
        want = 8.0 + codes[:, 4 * np.arange(4) + i] / E4M3_FAC[i]
        np.testing.assert_array_equal(got, want)
    # every code of the word sits in exactly one (level, byte) slot
    assert sorted(4 * b + i for i in range(4) for b in range(4)) == list(range(16))
    # the kernel's registers: one 128-token block of random key words, D 128
    geo = Geometry(2, 32, 128, 4, 128, key_format="e4m3x2")
    kw = rng.integers(0, 2**32, size=geo.BT // geo.P * geo.KW, dtype=np.uint64).astype(np.uint32)
    ops = simt.SimOps()
    head, chan, fac = geo.qexp8_tables
    rows = kw.reshape(geo.BT, geo.KW)
    code = (rows[:, :, None].astype(np.int64) >> (2 * np.arange(16))) & 3  # [token, word, k]
    for st, a in enumerate(blk.k_operands8(ops, geo, kw)):
        assert a.shape == (geo.BT, 32)
        for col in range(32):  # column col of step st meets one channel (of every head)
            (ch,) = {int(chan[st, n, col]) for n in range(geo.NK) if fac[st, n, col]}
            want = 8.0 + code[:, ch // 16, ch % 16] / E4M3_FAC[st % 4]
            np.testing.assert_array_equal(a.mat[:, col], want)


@pytest.mark.parametrize("geo", [g for g in GEOS if g.bits == 2],
                         ids=lambda g: f"b{g.bits}G{g.G}D{g.D}r{g.n_rep}BT{g.BT}")
def test_e4m3_query_table_meets_every_channel_once(geo):
    """The e4m3 Qexp (K-major rows) meets every (token of the row, head, channel) once, in
    the column of its (token, head, group), with the level's factor."""
    geo = dataclasses.replace(geo, key_format="e4m3x2")
    geo.validate()
    head, chan, fac = geo.qexp8_tables
    hits = np.zeros((geo.P, geo.n_rep, geo.D), int)
    for s, col, a in zip(*np.nonzero(fac)):
        h, ch = head[s, col, a], chan[s, col, a]
        p = [pp for pp in range(geo.P) if geo.k_col(pp, h, ch // geo.G) == col]
        assert len(p) == 1 and fac[s, col, a] == (1.0 if s % 4 in (0, 2) else 0.5)
        hits[p[0], h, ch] += 1
    assert np.all(hits == 1)


def test_e4m3_query_operands_split_and_constants():
    """query_operands8: hi + lo within 2**-8 of each scaled element (plus e4m3's half
    subnormal step), each head's largest |q| scaled into [64, 128) by a power of two,
    koff = 8 x the sum of exactly the stored e4m3 values, query sums scaled alike."""
    geo = Geometry(2, 32, 128, 4, 128, key_format="e4m3x2")
    qp = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, 128)) * jnp.asarray(
        [0.01, 1.0, 30.0])[None, :, None, None]  # three magnitudes, one per kv head
    qexp, kc = md.query_operands8(qp, geo)
    assert qexp.dtype == jnp.float8_e4m3fn and qexp.shape == (2, 3, 2 * geo.n_ksteps8, 16, 32)
    qe = np.asarray(qexp, np.float64).reshape(2, 3, geo.n_ksteps8, 2, 16, 32)
    hi, lo = qe[:, :, :, 0], qe[:, :, :, 1]
    kc = np.asarray(kc, np.float64)
    head, chan, fac = geo.qexp8_tables
    q = np.asarray(qp, np.float64) * md.LOG2E
    scale = 1.0 / kc[:, :, 2]  # [B, H, NK]
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # powers of two
    x = q[:, :, head, chan] * fac * scale[:, :, None, :, None]
    qh, qg, ok = geo.qsum_tables
    for h in range(geo.n_rep):  # |x| <= |q|: the levels' factors are 1 and 1/2
        (cols,) = np.nonzero(ok & (qh == h))
        assert np.all(scale[..., cols] == scale[..., cols[:1]])
        top_h = np.abs(q[:, :, h]).max(-1) * scale[..., cols[0]]
        assert np.all((top_h >= 64) & (top_h < 128)), top_h
    assert np.all(np.abs(hi + lo - x) <= np.abs(x) * 2.0**-8 + 2.0**-10)
    np.testing.assert_allclose(kc[:, :, 0], 8.0 * (hi + lo).sum(axis=(2, 4)), rtol=1e-6,
                               atol=1e-4)
    qsum = q.reshape(2, 3, 4, geo.ng, geo.G).sum(-1)[:, :, qh, qg] * ok
    np.testing.assert_allclose(kc[:, :, 1], qsum * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kc[:, :, 3], 0.0)


@pytest.mark.parametrize("name", [n if n in _E4M3_SIM else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _E4M3_GRID])
def test_simulated_e4m3_keys_equal_reference(name):
    """The kernel with e4m3 keys (simulated) against the reference, and more accurate than
    the bf16 key operands on the same inputs: hi + lo carries about 8 bits of each q
    element where the bf16 table rounds it to 8 bits in total. (The simulator accumulates
    the MMAs exactly; the H200's e4m3 MMAs accumulate with fewer bits, and the GPU test
    records both errors without ordering them.)"""
    cfg, D, Hq, Hkv, lengths, appends, opts = GRID[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
    (out8,) = _simulated_attention(cache, qp, dict(opts, key_format="e4m3x2"))
    (out16,) = _simulated_attention(cache, qp, opts)
    err8, err16 = _rel(out8, ref), _rel(out16, ref)
    assert err8 < TOL and err8 < err16, (err8, err16)
    empty = np.asarray(cache.lengths) == 0
    np.testing.assert_array_equal(np.asarray(out8)[empty], 0.0)


@pytest.mark.parametrize("name", _E4M3_SIM)
def test_e4m3_kernel_lowers_to_mosaic_gpu(name):
    """The kernel with e4m3 keys lowers (8-bit register operands, the K-major B tiles read
    transposed, the constants' copy a multiple of 128 bytes)."""
    cfg, D, Hq, Hkv, lengths, _, opts = GRID[name]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    kw = dict(opts, windows="epilogue", wide_copies=True, query="kernel", key_format="e4m3x2")
    f = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, **kw))
    from jax.sharding import use_abstract_mesh
    with use_abstract_mesh(abstract_h200()):  # the Triton query kernel casts to e4m3 (sm_89+)
        text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "lop3.b32" in text
    assert text.count("__gpu$xla.gpu.triton") == 2  # the query kernel and the epilogue


def test_e4m3_keys_reject_what_they_cannot_take():
    for bits, kind in ((4, "innerq"), (2, "outerq")):
        with pytest.raises(ValueError, match="key_format='e4m3x2' takes 2-bit InnerQ"):
            Geometry(bits, 32, 128, 4, 128, kind, "e4m3x2").validate()
    with pytest.raises(ValueError, match="key_format='fp8'; choose one of"):
        Geometry(2, 32, 128, 4, 128, key_format="fp8").validate()
    with pytest.raises(ValueError, match="query_operands8 builds the e4m3 keys' operands"):
        md.query_operands8(jnp.ones((1, 1, 4, 128)), Geometry(2, 32, 128, 4, 128))
    cfg = CacheConfig.innerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    with pytest.raises(ValueError, match="wgmma='inline': key_format='e4m3x2' takes"):
        md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                 num_splits=1, key_format="e4m3x2", wgmma="inline")
    with pytest.raises(ValueError, match="key_format='half'; choose one of"):
        md.mgpu_decode_attention(_query(cache, 1), cache.layer(0), cache.lengths, cfg,
                                 num_splits=1, key_format="half")


@pytest.mark.gpu
@pytest.mark.parametrize("name", _E4M3_GRID)
def test_gpu_e4m3_keys_equal_reference(name):
    """The compiled kernel with e4m3 keys against the reference, beside the bf16 keys' error
    on the same inputs (printed; both under the tolerance)."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): Mosaic GPU's CPU interpreter cannot run "
                    "pipelined copies, so the kernel runs only there")
    cfg, _, _, _, _, _, opts = GRID[name]
    cache, qp, ref = _gpu_case(name)
    errs = {}
    for fmt in ("e4m3x2", "bf16"):
        kw = dict(opts, windows="epilogue", wide_copies=True, query="kernel", key_format=fmt)
        out = jax.jit(lambda q, lay, n, kw=kw: md.mgpu_decode_attention(q, lay, n, cfg, **kw))(
            qp, cache.layer(0), cache.lengths)
        errs[fmt] = _rel(out, ref)
        empty = np.asarray(cache.lengths) == 0
        np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    print(f"{name}: rel err e4m3x2 {errs['e4m3x2']:.2e}, bf16 {errs['bf16']:.2e}")
    assert errs["e4m3x2"] < TOL and errs["bf16"] < TOL


@pytest.mark.parametrize("geo", [Geometry(2, 32, 128, 4, 128, key_format="e4m3x2"),
                                 Geometry(2, 32, 64, 3, 128, key_format="e4m3x2"),
                                 Geometry(2, 32, 128, 12, 128, key_format="e4m3x2")],
                         ids=lambda g: f"b{g.bits}G{g.G}D{g.D}r{g.n_rep}BT{g.BT}")
def test_e4m3_query_kernel_equals_xla_operands(geo):
    """The query kernel's e4m3 form (interpret mode) equals query_operands8: hi and lo bit
    for bit (koff cancels the +8 offset only for exactly these values), the constants up to
    the order of their float32 sums; three query magnitudes (the scale per head)."""
    from pallas_kernels.mgpu_query import query_operands_kernel
    qp = jax.random.normal(jax.random.PRNGKey(geo.D + geo.n_rep), (2, 3, geo.n_rep, geo.D))
    qp = qp * jnp.asarray([0.02, 1.0, 40.0])[None, :, None, None]
    cfg = CacheConfig.innerq(bits=geo.bits, group_size=geo.G, capacity=1024)
    layer = KVCache.create(cfg, 1, 2, 3, geo.D).layer(0)
    lengths = jnp.asarray([700, 37], jnp.int32)
    qe_ref, kc_ref = md.query_operands8(qp, geo)
    qe, kc, q_out, nq = query_operands_kernel(qp, geo, layer, lengths, cfg, interpret=True)
    assert qe.shape == qe_ref.shape and qe.dtype == jnp.float8_e4m3fn and kc.shape == kc_ref.shape
    np.testing.assert_array_equal(np.asarray(qe, np.float32), np.asarray(qe_ref, np.float32))
    kc, kc_ref = np.asarray(kc), np.asarray(kc_ref)  # sums of terms scaled up to 2**12
    np.testing.assert_allclose(kc, kc_ref, rtol=2e-6, atol=2e-6 * np.abs(kc_ref).max())
    assert np.abs(kc[:, :, 0]).max() > 1.0  # not vacuous: real sums
    np.testing.assert_array_equal(q_out, qp)
    np.testing.assert_array_equal(nq, region_sizes(lengths, cfg).quantized)

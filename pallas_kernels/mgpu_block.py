"""Per-thread code of the Mosaic GPU InnerQ kernel, written once against an ``ops`` backend.

Each function is what one thread of the 128-thread warpgroup does between two
wgmma chains. The kernel runs it with :class:`pallas_kernels.mgpu_decode.MlirOps`
(emitting Mosaic GPU IR inside ``plgpu.inline_mgpu``); the CPU tests run the same
functions with a numpy SIMT simulator (``tests/mgpu_simt.py``), so the index
arithmetic tested on the CPU is the arithmetic the GPU executes.

The backend provides:
  ``w, rr, c``         warp (0..3), lane // 4, lane % 4 of the thread (integers)
  ``load(ref, off, kind, n)``   n consecutive elements at element offset ``off``
                       (kind "u32"/"i32" -> integers, "bf16"/"f32" -> floats)
  ``store(ref, off, vals, kind, pred=None)``   n consecutive elements
  ``where, maximum, exp2, shfl_xor, round_bf16, f32, imin``   arithmetic
  ``bf16x2(bits)``     a wgmma A register from 32 bits (two bf16)
  ``e4m3x4(bits)``     an 8-bit wgmma A register from 32 bits (four e4m3, byte 0 first)
  ``and_or(x, mask, bits)``   (x & mask) | bits as one ``lop3`` (two constants: ptxas
                       splits the plain ``&``, ``|`` pair into two instructions)
  ``frag(kind, shape, regs)`` / ``get(frag, idx, e)``   register arrays in the wgmma
                       layout ("wgmma": index (m_tile, t8, rho)) or its column
                       reduction ("col": index (t8,)); register elements e = 0, 1
  ``barrier()``, ``fence_barrier()`` (async-proxy fence, then barrier)
  ``greater(a, b)``    a > b of two floats (a boolean; booleans support & and |)
  ``fence_barrier_any(flag)``   the fence, then a barrier that also ORs ``flag`` over the
                       warpgroup: every thread gets the same boolean
  ``cond(pred, if_true, if_false, n)``   a branch on a warpgroup-uniform boolean; each
                       side returns n floats, the chosen side's are returned
Integer values support + - * // % & | ^ << >> and comparisons; floats + - *.
"""

from __future__ import annotations

from pallas_kernels.mgpu_geometry import (E4M3_MAGIC, E4M3_PLAN, LOG2E, MAGIC, NEG, Geometry,
                                          pair_mask, pair_plan)

# rescale="lazy": the running maximum is kept while no score of a block passes it by more
# than this (log2 units), so a block's probabilities stay below 2**16: exact in bf16's and
# float32's range, and a 32k-token split's sums stay below 2**31
LAZY_RESCALE = 16.0


def _unpack(ops, word, bits: int, j: int, shifted: dict):
    """A register of code pair j of ``word``: one shift (shared per word) and one lop3."""
    sh, _ = pair_plan(bits)[j]
    key = (id(word), sh)
    if key not in shifted:
        shifted[key] = word >> sh if sh else word
    return ops.bf16x2(ops.and_or(shifted[key], pair_mask(bits, j), MAGIC))


def k_operands(ops, geo: Geometry, kw, steps=None):
    """The A operands of the key chain: arrays [MT*64, 16] for K steps ``steps`` (default
    all n_ksteps; step s = j*KT + T), in that order.

    kw: the block's key words [BT/P, KW] uint32 (row-major, flat).
    """
    steps = list(range(geo.n_ksteps)) if steps is None else list(steps)
    regs = {st: {} for st in steps}
    pairs_of = lambda T: [j for j in range(geo.half) if j * geo.KT + T in regs]  # noqa: E731
    for mt, rho, T, words in _key_row_words(ops, geo, kw, pairs_of):
        shifted = {}
        for j in pairs_of(T):
            for t in range(2):
                a = _unpack(ops, words[t], geo.bits, j, shifted)
                regs[j * geo.KT + T][(mt, t, rho)] = a
    return [ops.frag("wgmma", (64 * geo.MT, 16), regs[st]) for st in steps]


def _key_row_words(ops, geo: Geometry, kw, wanted):
    """(mt, rho, T, words) for each of the thread's two K rows per M-tile and each word tile T
    for which ``wanted(T)`` is not empty: its words 8T + 2c and 8T + 2c + 1 of the row (one
    8-byte load), in the order the chains' unpack consumes them."""
    for mt in range(geo.MT):
        for rho in range(2):
            row = 64 * mt + 16 * ops.w + ops.rr + 8 * rho
            for T in range(geo.KT):
                if wanted(T):
                    yield mt, rho, T, ops.load(kw, row * geo.KW + 8 * T + 2 * ops.c, "u32", 2)


def k_operands8(ops, geo: Geometry, kw, steps=None):
    """``key_format="e4m3x2"``: the A operands of the key chain as e4m3 arrays [MT*64, 32]
    for K steps ``steps`` (default all n_ksteps8; step s = 4T + i), in that order.

    Thread c of a row loads words 8T + 2c + t (t = 0, 1) of word tile T, as the bf16 form
    does; level i of each word (one shift, one lop3, E4M3_PLAN) is its register of columns
    16t + 4c .. 16t + 4c + 3 of step 4T + i (:attr:`Geometry.qexp8_tables`).
    """
    steps = list(range(geo.n_ksteps8)) if steps is None else list(steps)
    regs = {st: {} for st in steps}
    levels_of = lambda T: [i for i in range(4) if 4 * T + i in regs]  # noqa: E731
    for mt, rho, T, words in _key_row_words(ops, geo, kw, levels_of):
        for t in range(2):
            shifted = {}
            for i in levels_of(T):
                sh, mask = E4M3_PLAN[i]
                if sh not in shifted:
                    shifted[sh] = words[t] >> sh if sh else words[t]
                regs[4 * T + i][(mt, t, rho)] = ops.e4m3x4(
                    ops.and_or(shifted[sh], mask, E4M3_MAGIC))
    return [ops.frag("wgmma", (64 * geo.MT, 32), regs[st], dtype="e4m3") for st in steps]


def k_acc_init(ops, geo: Geometry, kconst):
    """-koff on every row: the codes' +128 offset, removed before any MMA runs."""
    regs = {}
    for t8 in range(geo.NK // 8):
        v = ops.load(kconst, 8 * t8 + 2 * ops.c, "f32", 2)
        for mt in range(geo.MT):
            for rho in range(2):
                regs[(mt, t8, rho)] = (-1.0 * v[0], -1.0 * v[1])
    return ops.frag("wgmma", (64 * geo.MT, geo.NK), regs, dtype="f32")


def softmax_step(ops, geo: Geometry, acc_k, ks, kz, kconst, m_cols, l_cols, o_full, n_valid,
                 xchg, pexp, tail=None, lazy: bool = False):
    """Scores and the block's whole online-softmax update, and the value operands of one block.

    acc_k: key accumulator [MT*64, NK] (codes dotted with Qexp); ks, kz: the block's
    key scales / zeros [BT, ng] (flat bf16); kconst: [kconst_rows, NK] f32 (koff, qsum; with
    e4m3 keys both scaled per head by a power of two, and the inverse of that scale);
    the state: m_cols running max per head, l_cols running sums ("col" [NV]), o_full the
    output ("wgmma" [D, NV]); n_valid: valid tokens of the block.
    Writes Pexp (bf16, tiled and swizzled) and exchanges block maxima and group sums
    through ``xchg``. Returns (m_cols, l_cols, o_full, [poff_cols per chunk],
    [psum_cols per chunk]): the new maximum, l and o multiplied by alpha = 2**(m_old - m_new)
    and l plus the block's sums (the value epilogue then adds the block's values to o);
    poff = sum of the stored Pexp values of a (head, token group) column, psum = sum of the
    bf16-rounded probabilities. ``tail``: the block's value scales and zeros (vs, vz) to
    clear past ``n_valid`` (:func:`zero_tail_groups`), or None. ``lazy``: the running maximum
    kept while no score passes it by more than :data:`LAZY_RESCALE` (:func:`_lazy_max`;
    ``rescale="lazy"``: l and o are multiplied only where the maximum moves), else updated
    every block.
    """
    w, rr, c = ops.w, ops.rr, ops.c
    P, OWN, ng = geo.P, geo.OWN, geo.ng
    if tail is not None:
        zero_tail_groups(ops, geo, *tail, n_valid)

    qsum, unscale = {}, {}
    for u in range(P * OWN):
        for g in range(ng):
            k = u * ng + g
            qsum[(u, g)] = ops.load(kconst, geo.NK + geo.col_of_slot(k, c), "f32", 1)[0]
        if geo.e4m3:  # the e4m3 columns hold q scaled by a power of two per head: undone once
            unscale[u] = ops.load(kconst, 2 * geo.NK + geo.col_of_slot(u * ng, c), "f32", 1)[0]

    # scores[(mt, rho, p, uh)]: token TM*mt + P*(16w + rr + 8rho) + p, head 4*uh + c
    scores = {}
    for mt in range(geo.MT):
        for rho in range(2):
            row = 16 * w + rr + 8 * rho
            for p in range(P):
                tau = geo.TM * mt + P * row + p
                ksv = ops.load(ks, tau * ng, "bf16", ng)
                kzv = ops.load(kz, tau * ng, "bf16", ng)
                valid = tau < n_valid
                for uh in range(OWN):
                    u = p * OWN + uh
                    s = None  # s = sum_g ks*a + kz*qsum as a chain of FMAs (no FADDs)
                    for g in range(ng):
                        k = u * ng + g
                        a = ops.get(acc_k, (mt, k // 2, rho), k % 2)
                        s = kzv[g] * qsum[(u, g)] if s is None else s + kzv[g] * qsum[(u, g)]
                        s = s + ksv[g] * a
                    if geo.e4m3:
                        s = s * unscale[u]
                    scores[(mt, rho, p, uh)] = ops.where(valid, s, NEG)

    if not lazy:
        m_new, alpha = _block_max(ops, geo, scores, m_cols, xchg)
        _probabilities(ops, geo, scores, m_new, xchg, pexp)
        ops.fence_barrier()
        l_cols, o_full = _carry_frags(ops, geo, _rescaled(
            geo, _carry_values(ops, geo, (l_cols, o_full)), alpha))
    else:
        m_new, (l_cols, o_full) = _lazy_max(ops, geo, scores, m_cols, xchg, pexp,
                                            (l_cols, o_full))

    poff_cols, psum_cols = [], []
    for ck in range(geo.NC):
        regs_off, regs_sum = {}, {}
        for t8 in range(geo.NV // 8):
            vo, vs = [], []
            for e in range(2):
                k = 2 * t8 + e
                uh, gt = k // geo.vg, k % geo.vg
                so = ss = ops.f32(0.0)
                if uh < OWN:
                    for mt, ww in geo.group_slices(ck, gt):
                        base = geo.xchg_max_size + (((mt * 4 + ww) * OWN + uh) * 4 + c) * 2
                        pair = ops.load(xchg, base, "f32", 2)
                        so, ss = so + pair[0], ss + pair[1]
                vo.append(so)
                vs.append(ss)
            regs_off[(t8,)] = tuple(vo)
            regs_sum[(t8,)] = tuple(vs)
        poff_cols.append(ops.frag("col", (geo.NV,), regs_off, dtype="f32"))
        psum_cols.append(ops.frag("col", (geo.NV,), regs_sum, dtype="f32"))

    m_cols_new, _ = _max_cols(ops, geo, m_new, None)
    l_regs = {}
    for t8 in range(geo.NV // 8):
        vals = []
        for e in range(2):
            x = ops.get(l_cols, (t8,), e)
            for ps in psum_cols:
                x = x + ops.get(ps, (t8,), e)
            vals.append(x)
        l_regs[(t8,)] = tuple(vals)
    l_new = ops.frag("col", (geo.NV,), l_regs, dtype="f32")
    return m_cols_new, l_new, o_full, poff_cols, psum_cols


def _probabilities(ops, geo: Geometry, scores, m, xchg, pexp):
    """p = 2**(score - m[uh]) of every owned score: written to Pexp (bf16 * 2**-e_j at the
    token's row of pair j), and the (head, token group) sums of the stored values and of
    the bf16-rounded probabilities, reduced over the warp and stored to ``xchg`` for the
    exchange that follows."""
    w, rr, c = ops.w, ops.rr, ops.c
    P, OWN = geo.P, geo.OWN
    first_lane = rr == 0
    exps = [e for _, e in pair_plan(geo.bits)]
    for mt in range(geo.MT):
        ck = (geo.TM * mt) // geo.TC
        for uh in range(OWN):
            poff = psum = None
            for rho in range(2):
                for p in range(P):
                    tau_c = geo.TM * (mt % (geo.TC // geo.TM)) + P * (16 * w + rr + 8 * rho) + p
                    j, a = geo.pexp_row(tau_c)
                    gt = tau_c // geo.G
                    down = ops.f32(1.0)
                    for jj in range(geo.half):  # 2**-e_j for a run-time j
                        down = ops.where(j == jj, ops.f32(2.0 ** -exps[jj]), down)
                    up = ops.f32(1.0)
                    for jj in range(geo.half):
                        up = ops.where(j == jj, ops.f32(2.0 ** exps[jj]), up)
                    pv = ops.exp2(scores[(mt, rho, p, uh)] - m[uh])
                    stored = ops.round_bf16(pv * down)  # exactly the value the MMA sees
                    ops.store(pexp, geo.pexp_offset(ck, j, a, geo.v_col(uh, gt, c)), [stored],
                              "bf16")
                    poff = stored if poff is None else poff + stored
                    pr = stored * up  # the bf16-rounded probability, exactly
                    psum = pr if psum is None else psum + pr
            for d in (4, 8, 16):
                poff = poff + ops.shfl_xor(poff, d)
                psum = psum + ops.shfl_xor(psum, d)
            base = geo.xchg_max_size + (((mt * 4 + w) * OWN + uh) * 4 + c) * 2
            ops.store(xchg, base, [poff, psum], "f32", pred=first_lane)


def _lazy_max(ops, geo: Geometry, scores, m_cols, xchg, pexp, carry):
    """``rescale="lazy"``: the block's probabilities against the running maximum as it stands,
    with no reduction before them; the exact block maximum only where some score exceeds
    it by more than :data:`LAZY_RESCALE` (log2 units: the probabilities then stay below
    2**LAZY_RESCALE, far inside bf16's and float32's range).

    Every thread tests its own scores; the warpgroup's barrier after the Pexp stores (the
    one the exchange needs anyway) also ORs the tests (``fence_barrier_any``), so the
    branch is uniform. Its rare side (a program's first block, whose running maximum is
    NEG, and any block whose scores jump past the margin) is :func:`_block_max`, the
    probabilities again at the exact maximum, and the state ``carry`` = (l_cols, o_full)
    multiplied by alpha = 2**(m_old - m_new). The common side keeps the maximum and leaves
    the state as it is (alpha would be exactly 1: no multiply at all). Returns (m_new per
    owned head, carry); the online softmax's partial (o, m, l) holds o and l relative to
    an m within LAZY_RESCALE of its true maximum, which every merge takes as it takes any m."""
    OWN = geo.OWN
    m_old = _running_max(ops, geo, m_cols)
    own = [_own_max(ops, scores, uh) for uh in range(OWN)]
    over = None
    for uh in range(OWN):
        o = ops.greater(own[uh], m_old[uh] + LAZY_RESCALE)
        over = o if over is None else over | o
    _probabilities(ops, geo, scores, m_old, xchg, pexp)
    any_over = ops.fence_barrier_any(over)
    flat = _carry_values(ops, geo, carry)

    def exact():
        m_new, alpha = _block_max(ops, geo, scores, m_cols, xchg, own)
        _probabilities(ops, geo, scores, m_new, xchg, pexp)
        ops.fence_barrier()
        return [*m_new, *_rescaled(geo, flat, alpha)]

    def kept():
        return [*m_old, *(v for _, v in flat)]

    res = ops.cond(any_over, exact, kept, OWN + len(flat))
    return res[:OWN], _carry_frags(ops, geo, res[OWN:])


def _carry_values(ops, geo: Geometry, carry):
    """(owned head slot of the column, value) of every register element of the state
    (l_cols "col" [NV], o_full "wgmma" [D, NV]), in :func:`_carry_frags`' order."""
    l_cols, o_full = carry
    out = []
    for t8 in range(geo.NV // 8):
        for e in range(2):
            out.append(((2 * t8 + e) // geo.vg, ops.get(l_cols, (t8,), e)))
    for mv in range(geo.MV):
        for t8 in range(geo.NV // 8):
            for rho in range(2):
                for e in range(2):
                    out.append(((2 * t8 + e) // geo.vg, ops.get(o_full, (mv, t8, rho), e)))
    return out


def _rescaled(geo: Geometry, flat, alpha):
    """The values of :func:`_carry_values` multiplied by their head's alpha (columns past
    the owned heads unchanged)."""
    return [v * alpha[uh] if uh < geo.OWN else v for uh, v in flat]


def _carry_frags(ops, geo: Geometry, vals):
    """The state (l_cols, o_full) rebuilt from :func:`_carry_values`' order."""
    it = iter(vals)
    n8 = geo.NV // 8
    l_regs = {(t8,): (next(it), next(it)) for t8 in range(n8)}
    o_regs = {(mv, t8, rho): (next(it), next(it))
              for mv in range(geo.MV) for t8 in range(n8) for rho in range(2)}
    return (ops.frag("col", (geo.NV,), l_regs, dtype="f32"),
            ops.frag("wgmma", (geo.D, geo.NV), o_regs, dtype="f32"))


def _block_max(ops, geo: Geometry, scores, m_cols, xchg, own=None):
    """(m_new, alpha) per owned head: the block's maximum of ``scores`` ({(..., uh): score},
    the last key the head slot) reduced thread -> warp (shuffles over rr) -> warpgroup
    (shared memory), merged with the running maximum; alpha = 2**(m_old - m_new). ``own``:
    the thread's own maxima per head where the caller has them (:func:`_own_max`)."""
    w, rr, c, OWN = ops.w, ops.rr, ops.c, geo.OWN
    m_old = _running_max(ops, geo, m_cols)
    first_lane = rr == 0
    for uh in range(OWN):
        mx = _own_max(ops, scores, uh) if own is None else own[uh]
        for d in (4, 8, 16):
            mx = ops.maximum(mx, ops.shfl_xor(mx, d))
        ops.store(xchg, (w * OWN + uh) * 4 + c, [mx], "f32", pred=first_lane)
    ops.barrier()
    m_new, alpha = [], []
    for uh in range(OWN):
        blk = None
        for ww in range(4):
            v = ops.load(xchg, (ww * OWN + uh) * 4 + c, "f32", 1)[0]
            blk = v if blk is None else ops.maximum(blk, v)
        mn = ops.maximum(m_old[uh], blk)
        m_new.append(mn)
        alpha.append(ops.exp2(m_old[uh] - mn))
    return m_new, alpha


def _running_max(ops, geo: Geometry, m_cols):
    """The running maximum of each owned head, from its "col" array."""
    return [ops.get(m_cols, ((uh * geo.vg) // 2,), (uh * geo.vg) % 2) for uh in range(geo.OWN)]


def _own_max(ops, scores, uh: int):
    """The largest of this thread's scores of owned head ``uh`` ({(..., uh): score})."""
    mx = None
    for key, v in scores.items():
        if key[-1] == uh:
            mx = v if mx is None else ops.maximum(mx, v)
    return mx


def _max_cols(ops, geo: Geometry, m_new, alpha):
    """m_new and alpha per owned head as "col" arrays over the value columns (alpha None:
    None)."""
    regs_m, regs_a = {}, {}
    for t8 in range(geo.NV // 8):
        vm, va = [], []
        for e in range(2):
            uh = (2 * t8 + e) // geo.vg
            vm.append(m_new[uh] if uh < geo.OWN else ops.f32(NEG))
            if alpha is not None:
                va.append(alpha[uh] if uh < geo.OWN else ops.f32(1.0))
        regs_m[(t8,)] = tuple(vm)
        regs_a[(t8,)] = tuple(va)
    m_cols = ops.frag("col", (geo.NV,), regs_m, dtype="f32")
    if alpha is None:
        return m_cols, None
    return m_cols, ops.frag("col", (geo.NV,), regs_a, dtype="f32")


def v_operands(ops, geo: Geometry, vw, ck: int, pairs=None):
    """A operands of V chunk ck: arrays [D, 16] of code pairs ``pairs`` (default all half),
    in that order. vw: the block's value words [BT/cpw, D] uint32 (flat)."""
    w, rr, c = ops.w, ops.rr, ops.c
    pairs = list(range(geo.half)) if pairs is None else list(pairs)
    regs = {j: {} for j in pairs}
    for mv in range(geo.MV):
        for t in range(2):
            wr = 8 * ck + 2 * c + t
            words = ops.load(vw, wr * geo.D + 64 * mv + 16 * w + 2 * rr, "u32", 2)  # rho = 0, 1
            for rho in range(2):
                shifted = {}
                for j in pairs:
                    regs[j][(mv, t, rho)] = _unpack(ops, words[rho], geo.bits, j, shifted)
    return [ops.frag("wgmma", (geo.D, 16), regs[j]) for j in pairs]


def v_acc_init(ops, geo: Geometry, poff_cols):
    """-128 * poff on every row: the codes' +128 offset of this chunk."""
    regs = {}
    for t8 in range(geo.NV // 8):
        v = (ops.get(poff_cols, (t8,), 0) * -128.0, ops.get(poff_cols, (t8,), 1) * -128.0)
        for mv in range(geo.MV):
            for rho in range(2):
                regs[(mv, t8, rho)] = v
    return ops.frag("wgmma", (geo.D, geo.NV), regs, dtype="f32")


def zero_tail_groups(ops, geo: Geometry, vs, vz, n_valid):
    """Zeros the value scales and zeros [BT/G, D] (flat bf16) of the groups at or past
    ``n_valid`` in shared memory (``tail="zero"``), so that :func:`v_epilogue` needs no
    mask: their probabilities are 0, so their accumulator columns are exactly 0, and
    0 * 0 adds nothing, whatever the cache held there (a stale NaN included). Stores
    predicated off except in a program's last block; :func:`softmax_step` runs this
    before its barriers, which order the stores before every thread's loads."""
    off = 8 * (32 * ops.w + 4 * ops.rr + ops.c)  # 8 channels (16 bytes) per thread
    in_row = off < geo.D  # (D <= 1024: one pass)
    zeros = [ops.f32(0.0)] * 8
    for gg in range(geo.BT // geo.G):
        ok = (n_valid <= gg * geo.G) & in_row
        ops.store(vs, gg * geo.D + off, zeros, "bf16", pred=ok)
        ops.store(vz, gg * geo.D + off, zeros, "bf16", pred=ok)


def v_epilogue(ops, geo: Geometry, o_full, acc_v, vs, vz, psum_cols, n_valid, ck: int):
    """o_full [D, NV] += scale * acc_v + zero * psum for V chunk ck (o_full already
    multiplied by alpha in :func:`softmax_step`). vs, vz: the block's value scales / zeros
    [BT/G, D] (flat bf16). Groups past ``n_valid`` are skipped (their scales may be anything); with
    ``n_valid`` None (``tail="zero"``) no mask: their scales must be zero
    (:func:`zero_tail_groups`)."""
    w, rr = ops.w, ops.rr  # a thread's rows are channels 16w + 2rr + (0, 1) of each M-tile
    ngc, OWN = geo.ngc, geo.OWN
    sc, zc = {}, {}
    for mv in range(geo.MV):
        for gt in range(ngc):
            off = (ck * ngc + gt) * geo.D + 64 * mv + 16 * w + 2 * rr
            # a group past n_valid reads as zeros: one select per word of two channels
            ok = None if n_valid is None else ck * geo.TC + gt * geo.G < n_valid
            s2 = ops.load(vs, off, "bf16", 2, keep=ok)
            z2 = ops.load(vz, off, "bf16", 2, keep=ok)
            for rho in range(2):
                sc[(mv, gt, rho)], zc[(mv, gt, rho)] = s2[rho], z2[rho]
    regs = {}
    for mv in range(geo.MV):
        for t8 in range(geo.NV // 8):
            for rho in range(2):
                vals = []
                for e in range(2):
                    k = 2 * t8 + e
                    o = ops.get(o_full, (mv, t8, rho), e)
                    if k // ngc < OWN:
                        gt = k % ngc
                        o = (o + sc[(mv, gt, rho)] * ops.get(acc_v, (mv, t8, rho), e)
                             + zc[(mv, gt, rho)] * ops.get(psum_cols, (t8,), e))
                    vals.append(o)
                regs[(mv, t8, rho)] = tuple(vals)
    return ops.frag("wgmma", (geo.D, geo.NV), regs, dtype="f32")


# ------------------------------------------------------- OuterQ (KIVI) layout
# K grouped per channel over G tokens, V per token over G channels; the codes are packed
# as InnerQ's (K along D, V along T), so the A operands and both MMA chains are the same.
# The scales vary along each product's reduction axis, so they fold into the B operands,
# rebuilt every block (pallas_kernels/outerq_blocks.py does the same in Triton):
#   Qexp[(j, a), (h, gt)] = bf16(q[h, ch] * s_k[gt, ch] * 2**-e_j)
#   score[t, h] = acc_k[t, (h, g(t))] + sum_d q[h, d] z_k[g(t), d] - 128 * sum Qexp[:, col]
#   Pexp[(j, a), (h, gd)] = bf16(p[t, h] * s_v[t, gd] * 2**-e_j)
#   o[d, h] += acc_v[d, (h, g(d))] + sum_t p[t, h] z_v[t, gd] - 128 * sum Pexp[:, col]
def _load_f32s(ops, ref, off, kind, n):
    """n consecutive values as float32, in vector loads of at most 16 bytes."""
    step = 8 if kind == "bf16" else 4
    out = []
    for k in range(0, n, step):
        out += ops.load(ref, off + k, kind, min(step, n - k))
    return out


def outer_key_operand(ops, geo: Geometry, qtab, ks, kz, qexp, kconst):
    """Writes the block's key B operand Qexp [n_ksteps, 16, NK] (tiled, swizzled) and its
    column constants kconst[0, col] = 128 * sum of the column's stored values - q . z_k
    (so that :func:`k_acc_init` starts each column at the zero term minus the codes'
    offset), then fences and synchronises the warpgroup.

    qtab: [NR, D] f32, q * log2 e (zero rows past n_rep); ks, kz: the block's key scales /
    zeros [ngv, D] (flat bf16). One thread per (key word wi, column (h, gt)): the word's
    cpw channels are consecutive, so each thread's loads are contiguous, and the nw
    threads of a column are adjacent lanes (one shuffle tree sums the column).
    """
    w, rr, c = ops.w, ops.rr, ops.c
    tid = 32 * w + 4 * rr + c
    nw, cpw, half, D, ngv = geo.nw, geo.cpw, geo.half, geo.D, geo.ngv
    plan = pair_plan(geo.bits)
    ncols = geo.NR * ngv
    npairs = nw * ncols
    for it in range(-(-npairs // 128)):
        pr = tid + 128 * it
        live = pr < npairs
        ci = pr // nw if npairs % 128 == 0 else ops.imin(pr // nw, ncols - 1)
        wi = pr % nw
        h, gt = ci // ngv, ci % ngv
        qv = _load_f32s(ops, qtab, h * D + wi * cpw, "f32", cpw)
        sv = _load_f32s(ops, ks, gt * D + wi * cpw, "bf16", cpw)
        zv = _load_f32s(ops, kz, gt * D + wi * cpw, "bf16", cpw)
        T, cc, t = wi // 8, (wi % 8) // 2, wi % 2
        col = geo.k_col(0, h, gt)
        tot = zq = None
        for k in range(cpw):
            j, i = k % half, k // half
            x = ops.round_bf16(qv[k] * sv[k] * (2.0 ** -plan[j][1]))
            ops.store(qexp, geo.b_offset(j * geo.KT + T, 8 * t + 2 * cc + i, col, geo.NK), [x],
                      "bf16", pred=None if npairs % 128 == 0 else live)
            tot = x if tot is None else tot + x
            zq = qv[k] * zv[k] if zq is None else zq + qv[k] * zv[k]
        val = tot * 128.0 - zq
        for d in (1, 2, 4, 8, 16):
            if d < nw:
                val = val + ops.shfl_xor(val, d)
        ops.store(kconst, col, [val], "f32", pred=live & (wi == 0))
    ops.fence_barrier()


def outer_softmax_step(ops, geo: Geometry, acc_k, vs, vz, m_cols, n_valid, xchg, pexp):
    """The OuterQ block's scores, online-softmax update and value operand.

    acc_k: key accumulator [MT*64, NK] (from :func:`k_acc_init` of the block's constants:
    column (h, gt) already holds the zero term); vs, vz: the block's value scales / zeros
    [BT, ng] (flat bf16). Writes Pexp [NC*half, 16, NV] (every (head, channel group)
    column of every token) and returns (m_new_cols, alpha_cols, [poff_cols per chunk],
    psum_cols, zsum_cols): poff the sums of the stored Pexp values per column, psum the
    probabilities' sum per head (in its channel group 0 column, 0 in the others), zsum
    sum_t p[t, h] z_v[t, gd] per column. Tokens at or past ``n_valid`` weigh 0, whatever
    their scales hold.
    """
    w, rr, c = ops.w, ops.rr, ops.c
    OWN, ng, G, ngv, Q = geo.OWN, geo.ng, geo.G, geo.ngv, geo.n_sums
    plan = pair_plan(geo.bits)

    # scores[(mt, rho, uh)]: token TM*mt + 16w + rr + 8rho, head 4*uh + c; its group's column
    scores = {}
    for mt in range(geo.MT):
        for rho in range(2):
            tau = geo.TM * mt + 16 * w + rr + 8 * rho
            gt = tau // G
            cands = sorted({(geo.TM * mt + 16 * ww + r + 8 * rho) // G
                            for ww in range(4) for r in range(8)})
            for uh in range(OWN):
                s = None
                for g in cands:
                    k = uh * ngv + g
                    a = ops.get(acc_k, (mt, k // 2, rho), k % 2)
                    s = a if s is None else ops.where(gt == g, a, s)
                scores[(mt, rho, uh)] = ops.where(tau < n_valid, s, NEG)

    m_new, alpha = _block_max(ops, geo, scores, m_cols, xchg)
    first_lane = rr == 0

    # p * s_v[t, gd] * 2**-e_j -> Pexp at the token's row of pair j, column (head, gd)
    exps = [e for _, e in plan]
    sums = {}  # (ck, uh) -> [poff_0.., zsum_0.., psum]
    for mt in range(geo.MT):
        ck = (geo.TM * mt) // geo.TC
        for rho in range(2):
            tau = geo.TM * mt + 16 * w + rr + 8 * rho
            tau_c = geo.TM * (mt % (geo.TC // geo.TM)) + 16 * w + rr + 8 * rho
            j, a = geo.pexp_row(tau_c)
            down = ops.f32(1.0)
            for jj in range(geo.half):  # 2**-e_j for a run-time j
                down = ops.where(j == jj, ops.f32(2.0 ** -exps[jj]), down)
            ok = tau < n_valid  # stale scales past the quantized tokens read as zeros
            if ng % 2 == 0:  # one select per word of two
                sv = ops.load(vs, tau * ng, "bf16", ng, keep=ok)
                zv = ops.load(vz, tau * ng, "bf16", ng, keep=ok)
            else:
                sv = [ops.where(ok, x, 0.0) for x in ops.load(vs, tau * ng, "bf16", ng)]
                zv = [ops.where(ok, x, 0.0) for x in ops.load(vz, tau * ng, "bf16", ng)]
            for uh in range(OWN):
                pv = ops.exp2(scores[(mt, rho, uh)] - m_new[uh])
                acc = sums.setdefault((ck, uh), [None] * Q)
                pd = pv * down
                for gd in range(ng):
                    x = ops.round_bf16(pd * sv[gd])  # exactly the value the MMA sees
                    ops.store(pexp, geo.pexp_offset(ck, j, a, geo.v_col(uh, gd, c)), [x], "bf16")
                    acc[gd] = x if acc[gd] is None else acc[gd] + x
                    z = pv * zv[gd]
                    acc[ng + gd] = z if acc[ng + gd] is None else acc[ng + gd] + z
                acc[2 * ng] = pv if acc[2 * ng] is None else acc[2 * ng] + pv
    for (ck, uh), acc in sums.items():
        for q, v in enumerate(acc):
            for d in (4, 8, 16):
                v = v + ops.shfl_xor(v, d)
            base = geo.xchg_max_size + ((((q * geo.NC + ck) * 4 + w) * OWN + uh) * 4 + c)
            ops.store(xchg, base, [v], "f32", pred=first_lane)
    ops.fence_barrier()

    def gathered(q, chunks):
        out = ops.f32(0.0)
        for ck in chunks:
            for ww in range(4):
                base = geo.xchg_max_size + ((((q * geo.NC + ck) * 4 + ww) * OWN + uh) * 4 + c)
                out = out + ops.load(xchg, base, "f32", 1)[0]
        return out

    poff_cols = []
    for ck in range(geo.NC):
        regs = {}
        for t8 in range(geo.NV // 8):
            vals = []
            for e in range(2):
                uh, gd = (2 * t8 + e) // ng, (2 * t8 + e) % ng
                vals.append(gathered(gd, [ck]) if uh < OWN else ops.f32(0.0))
            regs[(t8,)] = tuple(vals)
        poff_cols.append(ops.frag("col", (geo.NV,), regs, dtype="f32"))
    regs_z, regs_p = {}, {}
    for t8 in range(geo.NV // 8):
        vz_, vp = [], []
        for e in range(2):
            uh, gd = (2 * t8 + e) // ng, (2 * t8 + e) % ng
            live = uh < OWN
            vz_.append(gathered(ng + gd, range(geo.NC)) if live else ops.f32(0.0))
            vp.append(gathered(2 * ng, range(geo.NC)) if live and gd == 0 else ops.f32(0.0))
        regs_z[(t8,)] = tuple(vz_)
        regs_p[(t8,)] = tuple(vp)
    zsum_cols = ops.frag("col", (geo.NV,), regs_z, dtype="f32")
    psum_cols = ops.frag("col", (geo.NV,), regs_p, dtype="f32")
    m_cols_new, alpha_cols = _max_cols(ops, geo, m_new, alpha)
    return m_cols_new, alpha_cols, poff_cols, psum_cols, zsum_cols


def outer_v_epilogue(ops, geo: Geometry, o_full, acc_v, zsum_cols, alpha_cols):
    """o_full [D, NV] += acc_v + zsum in the column of each row's own channel group (after
    alpha * o_full when ``alpha_cols`` is given; ``zsum_cols`` None adds no zero term: give
    it to one V chunk of the block). Columns of other groups stay 0."""
    w, rr, OWN, ng, G = ops.w, ops.rr, geo.OWN, geo.ng, geo.G
    regs = {}
    for mv in range(geo.MV):
        for rho in range(2):
            gd_row = (64 * mv + 16 * w + 2 * rr + rho) // G  # the row's channel's group
            for t8 in range(geo.NV // 8):
                vals = []
                for e in range(2):
                    k = 2 * t8 + e
                    o = ops.get(o_full, (mv, t8, rho), e)
                    if alpha_cols is not None:
                        o = o * ops.get(alpha_cols, (t8,), e)
                    if k // ng < OWN:
                        x = o + ops.get(acc_v, (mv, t8, rho), e)
                        if zsum_cols is not None:
                            x = x + ops.get(zsum_cols, (t8,), e)
                        o = ops.where(gd_row == k % ng, x, o)
                    vals.append(o)
                regs[(mv, t8, rho)] = tuple(vals)
    return ops.frag("wgmma", (geo.D, geo.NV), regs, dtype="f32")


def store_partials(ops, geo: Geometry, o_full, m_cols, l_cols, o_out, ml_out):
    """Writes the program's partial: o_out [D, NV] (M-row order), ml_out [2, NV] (max, sum)."""
    w, rr, c = ops.w, ops.rr, ops.c
    for mv in range(geo.MV):
        for t8 in range(geo.NV // 8):
            for rho in range(2):
                m = 64 * mv + 16 * w + rr + 8 * rho
                vals = [ops.get(o_full, (mv, t8, rho), e) for e in range(2)]
                ops.store(o_out, m * geo.NV + 8 * t8 + 2 * c, vals, "f32")
    lead = (w == 0) & (rr == 0)
    for t8 in range(geo.NV // 8):
        ops.store(ml_out, 8 * t8 + 2 * c, [ops.get(m_cols, (t8,), e) for e in range(2)], "f32",
                  pred=lead)
        ops.store(ml_out, geo.NV + 8 * t8 + 2 * c, [ops.get(l_cols, (t8,), e) for e in range(2)],
                  "f32", pred=lead)


def zero_fill(ops, buf, n_elems_bf16: int):
    """Zeros a bf16 shared buffer, 8 elements (16 bytes) per thread and step."""
    tid = 32 * ops.w + 4 * ops.rr + ops.c
    for base in range(0, n_elems_bf16, 8 * 128):
        off = base + 8 * tid
        ops.store(buf, off, [ops.f32(0.0)] * 8, "bf16", pred=off < n_elems_bf16)


# ------------------------------------------------------------- bf16 windows
def window_scratch_size(geo: Geometry, n_window: int) -> int:
    """f32 scratch of the window program: q [r, D], p [tokens, r], two [4, r] exchanges."""
    return geo.n_rep * geo.D + n_window * geo.n_rep + 8 * geo.n_rep


def window_attention(ops, geo: Geometry, q, windows, valid, scr, o_out, ml_out):
    """Online-softmax partial of the bf16 sink and recent windows of one (sequence, kv head),
    on CUDA cores (at most S + R + G - 1 live tokens), written like a kernel split's partial.

    q: [r*D] f32 (q'; scaled by log2 e here); windows: [(k, v, n_tokens)] bf16 [n*D] refs (sink, recent
    ring), tokens numbered in that order; valid: [sum n] int32 (1 = live); scr: f32 scratch
    (:func:`window_scratch_size`); o_out [D, NV], ml_out [2, NV] as :func:`store_partials`.
    """
    w, rr, c = ops.w, ops.rr, ops.c
    tid = 32 * w + 4 * rr + c
    r, D = geo.n_rep, geo.D
    nwin = sum(n for _, _, n in windows)
    P0 = r * D  # p [t, h] at P0 + t*r + h
    X0 = P0 + nwin * r  # exchanges [2][4 warps][r]
    for base in range(0, r * D, 4 * 128):
        off = base + 4 * tid
        ok = off < r * D
        qv = ops.load(q, ops.imin(off, r * D - 4), "f32", 4)
        ops.store(scr, off, [x * LOG2E for x in qv], "f32", pred=ok)
    ops.barrier()

    # scores of the thread's tokens (token tid + 128k of each window)
    mine = []  # (global token index, in range, [score per head])
    t0 = 0
    for kref, _, n in windows:
        for base in range(0, n, 128):
            t = base + tid
            ok = t < n
            tt = ops.imin(t, n - 1)
            s = [None] * r
            for d0 in range(0, D, 8):
                kv = ops.load(kref, tt * D + d0, "bf16", 8)
                for h in range(r):
                    qv = (ops.load(scr, h * D + d0, "f32", 4)
                          + ops.load(scr, h * D + d0 + 4, "f32", 4))
                    for e in range(8):
                        term = qv[e] * kv[e]
                        s[h] = term if s[h] is None else s[h] + term
            live = ok & (ops.load(valid, t0 + tt, "i32", 1)[0] != 0)
            mine.append((t0 + tt, ok, live, [ops.where(live, x, NEG) for x in s]))
        t0 += n

    def reduce_heads(vals, combine, x0):
        """Warpgroup-wide reduction of one value per head (all threads get the result)."""
        out = []
        for h in range(r):
            v = vals[h]
            for d in (1, 2, 4, 8, 16):
                v = combine(v, ops.shfl_xor(v, d))
            ops.store(scr, x0 + w * r + h, [v], "f32", pred=(rr == 0) & (c == 0))
        ops.barrier()
        for h in range(r):
            acc = None
            for ww in range(4):
                x = ops.load(scr, x0 + ww * r + h, "f32", 1)[0]
                acc = x if acc is None else combine(acc, x)
            out.append(acc)
        return out

    mx = [None] * r
    for _, _, _, s in mine:
        for h in range(r):
            mx[h] = s[h] if mx[h] is None else ops.maximum(mx[h], s[h])
    m = reduce_heads(mx, ops.maximum, X0)
    lsum = [ops.f32(0.0)] * r
    for t, ok, live, s in mine:
        ps = [ops.where(live, ops.exp2(s[h] - m[h]), 0.0) for h in range(r)]
        for h in range(r):
            lsum[h] = lsum[h] + ps[h]
        ops.store(scr, P0 + t * r, ps, "f32", pred=ok)
    l_tot = reduce_heads(lsum, lambda a, b: a + b, X0 + 4 * r)  # (its barrier orders p too)

    # o[h, d] = sum_t p[t, h] v[t, d]: one channel per thread
    for d0 in range(0, D, 128):
        d = d0 + tid
        dok = d < D
        dd = ops.imin(d, D - 1)
        o = [ops.f32(0.0)] * r
        t0 = 0
        for _, vref, n in windows:
            for t in range(n):
                v = ops.load(vref, t * D + dd, "bf16", 1)[0]
                pv = ops.load(scr, P0 + (t0 + t) * r, "f32", r)
                for h in range(r):
                    o[h] = o[h] + pv[h] * v
            t0 += n
        # the partial's row of channel d, columns (head h, token group 0)
        m_row = geo.v_row(dd)
        for col in range(geo.NV):
            hh = geo.v_col_head(col)
            val = o[hh] if hh is not None else ops.f32(0.0)
            ops.store(o_out, m_row * geo.NV + col, [val], "f32", pred=dok)
    lead = tid == 0
    for col in range(geo.NV):
        hh = geo.v_col_head(col)
        ops.store(ml_out, col, [m[hh] if hh is not None else ops.f32(NEG)], "f32", pred=lead)
        ops.store(ml_out, geo.NV + col, [l_tot[hh] if hh is not None else ops.f32(0.0)], "f32",
                  pred=lead)

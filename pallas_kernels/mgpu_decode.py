"""Fused InnerQ decode attention on Pallas' Mosaic GPU backend (Hopper, sm_90a).

``mgpu_decode_attention(qp, layer, lengths, cfg)`` equals
``innerq_jax.reference.quantized_attention_core`` (the contract): softmax over the
bf16 sink window, the packed quantized region and the bf16 recent ring, then the
probability-weighted values; f32 [B, Hkv, n_rep, D].

The same kernel runs the OuterQ (KIVI) layout (``cfg.kind == "outerq"``; one token per
key row: 2-bit D 128, 4-bit D 64 and 128), so that the inner-versus-outer comparison is
made on one backend: its codes are packed as InnerQ's, so the A operands and MMA chains
are the same, and its scales fold into the B operands, which the warpgroup rebuilds in
every block (Qexp from the query table and the block's key scales, Pexp with every
channel group's value scale; :func:`pallas_kernels.mgpu_block.outer_key_operand`,
:func:`~pallas_kernels.mgpu_block.outer_softmax_step`). Its query table comes from XLA
(``query="xla"``); the InnerQ-only options (``query="kernel"``, ``windows="kernel"``,
``tail="zero"``, ``chain_parts``, ``wgmma="inline"``) are rejected for it.

Structure (one launch of the Mosaic GPU kernel, plus the work around it):

* per call, the expanded query ``Qexp`` (the B operand of the key MMAs, built once
  per (sequence, kv head) instead of once per program) and its column constants
  (``koff``, the codes' +128 offset, and the per-group query sums): in XLA
  (``query="xla"``) or one Triton launch (``query="kernel"``,
  :mod:`pallas_kernels.mgpu_query`);
* kernel, grid (splits, Hkv, B), one warpgroup per program: ``plgpu.emit_pipeline``
  streams the blocks of the program's token range with TMA (key words, key
  scales and zeros, value words, value scales and zeros; ``num_stages`` blocks in
  flight; ``wide_copies``: each in boxes of rows as wide as divide it); per block
  the key chain (wgmma, A = unpacked codes in registers, tokens on M), the scores
  and the online softmax (maxima exchanged once per block
  through shared memory; with ``rescale="lazy"``, the H200's default, the running
  maximum is kept while no score passes it by ``mgpu_block.LAZY_RESCALE`` and the
  exchange of maxima, and the output's and sums' rescale, run only where one does), the
  probabilities written as the B operand ``Pexp`` of
  the value chain (wgmma, A = unpacked value codes, channels on M), and the
  per-group scale multiply of both in registers. Each program writes its partial
  (o, running max, sum) in its own accumulator-column order;
* the bf16 sink and recent windows (at most S + R + G - 1 tokens) and the merge of
  all partials, which also undoes the column order: either XLA (an einsum pair and
  the merge, ``windows="xla"``, about fifteen small launches), one Triton launch
  (``windows="epilogue"``, :mod:`pallas_kernels.mgpu_epilogue`), or the windows in one
  more program of the kernel per (sequence, kv head) and the merge alone in the Triton
  launch (``windows="kernel"``).

Per-thread code lives in :mod:`pallas_kernels.mgpu_block` (tested on the CPU by a
simulator), the tile maps in :mod:`pallas_kernels.mgpu_geometry`. Mosaic GPU
cannot run pipelined copies in its CPU interpreter, so the kernel itself runs
only on a Hopper GPU; its lowering (to Mosaic GPU IR) also runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import recent_slot_tokens, region_sizes
from innerq_jax.reference import quantized_attention_core
from pallas_kernels import mgpu_block as blk
from pallas_kernels import query_prep as qprep
from pallas_kernels.device_info import sm_count
from pallas_kernels.mgpu_geometry import (E4M3_OFFSET, KEY_FORMATS, LOG2E, NEG, SWIZZLE, Geometry,
                                          default_block_tokens, e4m3_head_scale)
from pallas_kernels.query_prep import QueryPrep
from pallas_kernels.window_blocks import WINDOW_HEADS

try:  # Mosaic GPU's IR builders (present in jaxlib >= 0.11 on every platform)
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import mma_utils
    from jax.experimental.mosaic.gpu import utils as mu
    mwgmma = importlib.import_module("jax.experimental.mosaic.gpu.wgmma")  # the module
    from jaxlib.mlir import ir
    from jax.experimental.mosaic.gpu.launch_context import OOBFillMode
    from jaxlib.mlir.dialects import arith, llvm, nvvm, scf, vector
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "pallas_kernels.mgpu_decode needs jax's Mosaic GPU (jax>=0.11.2,<0.12, the range it was "
        f"checked on); import failed: {e}") from e

_CHECKED_JAX = ((0, 11, 2), (0, 12, 0))  # [low, high): versions this kernel was checked on


def _check_jax_version() -> None:
    v = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())
    lo, hi = _CHECKED_JAX
    if not lo <= v < hi:
        raise RuntimeError(
            f"pallas_kernels.mgpu_decode uses Mosaic GPU internals (fragmented_array, inline_mgpu) "
            f"checked on jax {'.'.join(map(str, lo))} <= version < {'.'.join(map(str, hi))}; "
            f"found jax {jax.__version__}")


# Tuned defaults per device kind: the fastest point measured on the GPU and checked there
# (benchmarks/KERNEL_NOTES.md, sections "Mosaic GPU", "Round 5" and "Round 8").
# ``preferred``: where the backend dispatch runs this kernel instead of the Triton one:
# False, True, or a rule over the call's shape, ``dict(min_pair_tokens=N)``: at least N
# cache tokens over all (sequence, kv head) pairs (batch x kv heads x capacity), the work
# that pays for the op's fixed cost (the query launch, the epilogue's launch and its merge).
# Both ops timed in one process on the H200 (round 16, results/kernels_points_round16_
# dispatch.json): the Mosaic op is ahead from 2**20 pair-tokens on (B 1 / 128k 0.081 ms
# against 0.092, B 2 / 64k 0.080 / 0.084, B 4 / 32k 0.081 / 0.091; and round 8's B 8 / 16k,
# B 8 / 32k, B 32 / 16k) and behind at 2**19 and below (B 1 / 64k 0.067 / 0.055, B 8 / 8k
# 0.061 / 0.056, B 1 / 32k, B 1 / 16k); OuterQ's Mosaic op is ahead from 2**19 (B 1 / 64k
# 0.070 / 0.073) and behind at 2**18 (round 14: B 1 / 32k, B 8 / 4k) and below. Before round
# 16 the rule was 64 pairs and a 16k-token cache (round 8: B 1 / 128k then measured 0.098
# against 0.089, before round 15's epilogue merge).
# Round 8's record of the same choice, before that epilogue: ahead at B 8 / 16k, B 8 / 32k,
# B 32 / 16k (64 and 256 pairs: 0.087 / 0.137 / 0.268 ms against 0.091 / 0.156 / 0.303),
# behind with fewer pairs or shorter caches (B 1 / 128k 0.098 against
# 0.089; B 8 / 4k, B 1 / 32k, B 1 / 4k, SmolLM2 B 8 / 8k), where the Triton kernel's
# in-kernel merge and window program cost less than the epilogue launch. The query
# operands in one Triton launch (query="kernel") took B 8 / 32k from 0.142 to 0.136 ms in
# one run (results/mgpu_probe_query.json). pipeline="bulk" and windows="kernel" pass the
# GPU tests and measured slower (runs 3-5; windows="kernel" again in round 9, its window
# program raising the kernel's registers), as did tail="zero" (176-182 registers: two
# programs per SM) and chain_parts 2 / 4 (136 / 121 registers, but each wait exposes a
# wgmma's latency): results/mgpu_probe_round9*.json, KERNEL_NOTES.md "Round 9". wgmma="inline"
# (12 registers fewer) and pipeline="bulk" measured level with the default in round 13
# (results/mgpu_probe_round13.json).
# ``rescale="lazy"`` (round 34, results/mgpu_probe_round34b.json, two alternated pairs): the
# kernel alone 0.1086 against 0.1117 ms at B 8 / 32k (the op 0.1247 against 0.1297), level
# at B 1 / 128k (0.0599 / 0.0600); 168 registers as the default; Nsight Compute: 718 loop
# instructions per warp and block against 731, 101.2 against 105.2 us. Round 35 (no multiply
# by alpha = 1 on its common side, results/ncu/ncu_round35c_final_summary.json): 700
# instructions, 98.8 us; the op 0.1238 ms at B 8 / 32k (results/kernels_points_round35b.json).
# ``ctas_per_sm_outerq``: the OuterQ layout's kernel holds 215 registers per thread (its
# per-block Qexp and its Pexp of every channel group), so two programs fit an SM: split for
# two (B 8 / 32k op 0.206 ms against 0.272 at three; results/mgpu_probe_round14d.json).
# ``preferred_outerq``: the same form of rule, measured for OuterQ against the Triton OuterQ
# op in one process (results/kernels_points_round14_outer_dispatch.json: ahead by 8-11% at
# B 8 / 32k, B 8 / 16k and B 32 / 16k, behind at B 1 / 128k (0.134 against 0.127), B 1 / 32k
# and B 8 / 4k; round 16, after the epilogue's merge: ahead at B 1 / 128k, 0.115 / 0.125).
TUNED = {
    "NVIDIA H200": dict(block_tokens=128, num_stages=4, ctas_per_sm=3, ctas_per_sm_outerq=2,
                        explicit_barriers=True, pipeline="emit", windows="epilogue",
                        wide_copies=True, query="kernel", rescale="lazy",
                        preferred=dict(min_pair_tokens=1 << 20),
                        preferred_outerq=dict(min_pair_tokens=1 << 19)),
}
_FALLBACK = dict(block_tokens=None, num_stages=4, ctas_per_sm=3, ctas_per_sm_outerq=2)


# where the bf16 windows are attended and the splits merged: "xla" (an einsum pair and the
# merge as XLA fusions), "kernel" (one more Mosaic program per (sequence, kv head), merged by
# one Triton launch, mgpu_epilogue.merge_partials; in XLA past 16 query heads per kv head)
# or "epilogue" (one Triton launch after the kernel does both, mgpu_epilogue.py)
WINDOWS = ("xla", "kernel", "epilogue")
# where the query operands (Qexp, kconst) are built: "xla" (query_operands, four small
# fusions) or "kernel" (one Triton launch, mgpu_query.py)
QUERY = ("xla", "kernel")
# how the value scales of groups past a block's valid tokens are kept out: "mask" (a select
# per word of two scales in every block) or "zero" (the last block's zeroed in shared memory)
TAIL = ("mask", "zero")
# how the key and value chains issue their wgmmas: "pallas" (``plgpu.wgmma`` per step, a
# fence and a commit each; the B descriptors are loop invariants) or "inline" (one inline
# block per chain: one fence, one commit, each B descriptor one add per block, see
# _wgmma_chain)
WGMMA = ("pallas", "inline")
# where a cache that rotates its values has the rotation undone (with ``prep``): "xla" (after
# the epilogue, which then stores float32) or "kernel" (the epilogue's last channel block per
# (sequence, kv head), mgpu_epilogue.windows_and_merge(finish_values=True); windows="epilogue").
# "xla" is the default: on the H200 "kernel" measured 1.6 us faster at B 1 / 128k and 3.5 us
# slower at B 8 / 32k and B 4 / 32k (benchmarks/KERNEL_NOTES.md, "Round 17")
FINISH = ("xla", "kernel")
# how the online softmax keeps its running maximum: "block" (the block's exact maximum,
# reduced over the warpgroup before its probabilities, every block) or "lazy" (kept while
# no score passes it by more than mgpu_block.LAZY_RESCALE; the exact path only then)
RESCALE = ("block", "lazy")
_OPTIONS = frozenset({"block_tokens", "num_splits", "num_stages", "ctas_per_sm",
                      "explicit_barriers", "pipeline", "windows", "wide_copies", "query", "tail",
                      "chain_parts", "wgmma", "finish", "key_format", "rescale"})


def preferred(cfg: CacheConfig, options=(), device=None, pairs: int | None = None,
              head_dim: int | None = None) -> bool:
    """Whether the backend dispatch should run this kernel: an InnerQ cache (or an OuterQ
    one of a geometry this kernel takes, ``head_dim`` given), a GPU whose tuned entry says
    this kernel measured faster than the Triton one for the layout (``preferred``,
    ``preferred_outerq``; for a shape rule: ``pairs`` (batch x kv heads) times the cache's
    capacity against its ``min_pair_tokens``), and only options this kernel takes (Triton-only options keep the Triton
    kernel)."""
    if cfg.kind not in ("innerq", "outerq") or set(options) - _OPTIONS:
        return False
    if cfg.kind == "outerq":
        if head_dim is None:
            return False
        geo = Geometry(cfg.bits, cfg.group_size, head_dim, 1,
                       default_block_tokens(cfg.bits, cfg.group_size, head_dim), cfg.kind)
        try:
            geo.validate()
        except ValueError:
            return False
    device = device or jax.devices()[0]
    entry = TUNED.get(device.device_kind, {})
    rule = entry.get("preferred_outerq" if cfg.kind == "outerq" else "preferred", False)
    if device.platform != "gpu" or not rule:
        return False
    if isinstance(rule, dict):
        return pairs is not None and pairs * cfg.capacity >= rule["min_pair_tokens"]
    return True


def tuned_defaults(device=None) -> dict:
    device = device or jax.devices()[0]
    return dict(TUNED.get(device.device_kind, _FALLBACK))


# =================================================================== IR backend
_I32 = None


def _i32():
    return ir.IntegerType.get_signless(32)


def _c(x: int):
    return mu.c(int(x), _i32())


class _B:
    """An i1 value."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __and__(self, o):
        return _B(arith.andi(self.v, o.v))

    def __or__(self, o):
        return _B(arith.ori(self.v, o.v))


class _I:
    """An i32 value (thread coordinates, offsets); operators emit arith ops."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    @staticmethod
    def _v(x):
        return x.v if isinstance(x, _I) else _c(x)

    def _bin(self, o, op):
        return _I(op(self.v, _I._v(o)))

    def __add__(self, o):
        return self if (isinstance(o, int) and o == 0) else self._bin(o, arith.addi)

    __radd__ = __add__

    def __sub__(self, o):
        return self._bin(o, arith.subi)

    def __rsub__(self, o):
        return _I(arith.subi(_I._v(o), self.v))

    def __mul__(self, o):
        if isinstance(o, int) and o == 1:
            return self
        return self._bin(o, arith.muli)

    __rmul__ = __mul__

    def __floordiv__(self, o):
        return self._bin(o, arith.divui)

    def __mod__(self, o):
        return self._bin(o, arith.remui)

    def __and__(self, o):
        return self._bin(o, arith.andi)

    def __or__(self, o):
        return self._bin(o, arith.ori)

    def __xor__(self, o):
        return self._bin(o, arith.xori)

    def __lshift__(self, o):
        return self._bin(o, arith.shli)

    def __rshift__(self, o):
        return self._bin(o, arith.shrui)

    def _cmp(self, o, pred):
        return _B(arith.cmpi(pred, self.v, _I._v(o)))

    def __lt__(self, o):
        return self._cmp(o, arith.CmpIPredicate.slt)

    def __gt__(self, o):
        return self._cmp(o, arith.CmpIPredicate.sgt)

    def __le__(self, o):
        return self._cmp(o, arith.CmpIPredicate.sle)

    def __ge__(self, o):
        return self._cmp(o, arith.CmpIPredicate.sge)

    def __eq__(self, o):
        return self._cmp(o, arith.CmpIPredicate.eq)

    def __ne__(self, o):
        return self._cmp(o, arith.CmpIPredicate.ne)

    __hash__ = object.__hash__


def _contract():
    """arith fastmath ``contract``: lets LLVM fuse a multiply and an add into one FFMA (without
    it the H200 profile showed no FFMA at all: every ``s * acc + z * q`` was FMUL + FADD)."""
    return ir.Attribute.parse("#arith.fastmath<contract>")


class _F:
    """An f32 value; operators emit arith ops (multiplies and adds may contract to FMAs)."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    @staticmethod
    def _v(x):
        if isinstance(x, _F):
            return x.v
        f32 = ir.F32Type.get()
        return arith.constant(f32, ir.FloatAttr.get(f32, float(x)))

    def __add__(self, o):
        return _F(arith.addf(self.v, _F._v(o), fastmath=_contract()))

    __radd__ = __add__

    def __sub__(self, o):
        return _F(arith.subf(self.v, _F._v(o), fastmath=_contract()))

    def __mul__(self, o):
        return _F(arith.mulf(self.v, _F._v(o), fastmath=_contract()))

    __rmul__ = __mul__


_FULL_INDEX = {
    "wgmma": lambda idx: (idx[0], idx[1], 0, 0, idx[2], 0, 0, 0, 0),
    "col": lambda idx: (idx[0], 0, 0),
}


class MlirOps:
    """The ``ops`` backend of :mod:`pallas_kernels.mgpu_block` inside ``plgpu.inline_mgpu``."""

    def __init__(self, no_sync: bool = False):
        self._no_sync = no_sync  # timing ablation only: cross-warp exchanges unsynchronized
        tid = _I(mu.thread_idx())
        lane = tid % 32
        self.w = (tid // 32) % 4
        self.rr = lane // 4
        self.c = lane % 4
        self._ptrs = {}

    # ---------------------------------------------------------------- scalars
    @staticmethod
    def f32(x):
        return _F(_F._v(x))

    @staticmethod
    def where(cond, a, b):
        return _F(arith.select(cond.v, _F._v(a), _F._v(b)))

    @staticmethod
    def maximum(a, b):
        return _F(arith.maximumf(_F._v(a), _F._v(b)))

    @staticmethod
    def greater(a, b):
        return _B(arith.cmpf(arith.CmpFPredicate.OGT, _F._v(a), _F._v(b)))

    @staticmethod
    def exp2(x):
        f32 = ir.F32Type.get()
        return _F(llvm.inline_asm(f32, [_F._v(x)], "ex2.approx.ftz.f32 $0, $1;", "=f,f"))

    @staticmethod
    def round_bf16(x):
        f32, bf16 = ir.F32Type.get(), ir.BF16Type.get()
        return _F(arith.extf(f32, arith.truncf(bf16, _F._v(x))))

    @staticmethod
    def imin(a, b):
        return _I(arith.minsi(_I._v(a), _I._v(b)))

    @staticmethod
    def shfl_xor(x, d):
        return _F(mu.shfl_bfly(_F._v(x), d))

    @staticmethod
    def and_or(x, mask: int, bits: int):
        """(x & mask) | bits in one lop3 (LUT 0xea = (a & b) | c), both constants in
        registers; written as two arith ops, ptxas emits two LOP3s (one immediate each)."""
        i32 = _i32()
        return _I(llvm.inline_asm(i32, [_I._v(x), _c(mask), _c(bits)],
                                  "lop3.b32 $0, $1, $2, $3, 0xea;", "=r,r,r,r"))

    @staticmethod
    def bf16x2(bits):
        return mu.bitcast(bits.v, ir.VectorType.get((2,), ir.BF16Type.get()))

    @staticmethod
    def e4m3x4(bits):
        return mu.bitcast(bits.v, ir.VectorType.get((4,), ir.Float8E4M3FNType.get()))

    # ----------------------------------------------------------------- memory
    def _ptr(self, ref):
        key = id(ref)
        if key not in self._ptrs:
            self._ptrs[key] = (ref, mu.memref_ptr(ref))
        return self._ptrs[key][1]

    @staticmethod
    def _elem(kind):
        return {"u32": _i32(), "i32": _i32(), "bf16": ir.BF16Type.get(),
                "f32": ir.F32Type.get()}[kind]

    @staticmethod
    def _align(kind, n):
        """Vector accesses of n elements start at multiples of n elements."""
        return (2 if kind == "bf16" else 4) * (n & -n)

    def load(self, ref, off, kind, n, keep=None):
        """n elements from ``off``; with ``keep`` (an i1; bf16 pairs only) zeros where it is
        false, one select per 32-bit word instead of one per element."""
        if kind == "bf16" and n % 2 == 0:
            return self._load_bf16_pairs(ref, off, n, keep)
        if keep is not None:
            raise NotImplementedError("keep= is implemented for bf16 pairs")
        et = self._elem(kind)
        ptr = mu.getelementptr(self._ptr(ref), [_I._v(off)], et)
        nbytes = self._align(kind, n)
        if n == 1:
            vals = [llvm.load(et, ptr, alignment=nbytes)]
        else:
            vec = llvm.load(ir.VectorType.get((n,), et), ptr, alignment=nbytes)
            vals = [vector.extract(vec, dynamic_position=[],
                                   static_position=ir.DenseI64ArrayAttr.get([k]))
                    for k in range(n)]
        if kind in ("u32", "i32"):
            return [_I(v) for v in vals]
        if kind == "bf16":
            return [_F(arith.extf(ir.F32Type.get(), v)) for v in vals]
        return [_F(v) for v in vals]

    def _load_bf16_pairs(self, ref, off, n, keep=None):
        """n bf16 (n even) as float32, two per 32-bit word: the low one by a 16-bit shift, the
        high one by masking off the low half (one LOP3; ``extf`` of a vector element costs a
        PRMT and a shift for it)."""
        i32, f32 = _i32(), ir.F32Type.get()
        ptr = mu.getelementptr(self._ptr(ref), [_I._v(off)], ir.BF16Type.get())
        if n == 2:
            words = [llvm.load(i32, ptr, alignment=4)]
        else:
            vec = llvm.load(ir.VectorType.get((n // 2,), i32), ptr, alignment=self._align("bf16", n))
            words = [vector.extract(vec, dynamic_position=[],
                                    static_position=ir.DenseI64ArrayAttr.get([k]))
                     for k in range(n // 2)]
        if keep is not None:
            words = [arith.select(keep.v, w, _c(0)) for w in words]
        out = []
        for w in words:
            out.append(_F(arith.bitcast(f32, arith.shli(w, _c(16)))))
            out.append(_F(arith.bitcast(f32, arith.andi(w, _c(-65536)))))
        return out

    def store(self, ref, off, vals, kind, pred=None):
        et = self._elem(kind)
        ptr = mu.getelementptr(self._ptr(ref), [_I._v(off)], et)
        raw = []
        for v in vals:
            x = _F._v(v)
            raw.append(arith.truncf(et, x) if kind == "bf16" else x)
        n = len(raw)
        nbytes = self._align(kind, n)
        val = raw[0] if n == 1 else vector.from_elements(ir.VectorType.get((n,), et), raw)
        if pred is None:
            llvm.store(val, ptr, alignment=nbytes)
        else:
            with mu.when(pred.v):
                llvm.store(val, ptr, alignment=nbytes)

    def barrier(self):
        if not self._no_sync:
            mu.warpgroup_barrier()

    def fence_barrier(self):
        if self._no_sync:
            return
        mu.commit_shared()  # fence.proxy.async (Pexp is read by wgmma), then barrier

    def fence_barrier_any(self, flag):
        """fence_barrier whose barrier also ORs ``flag`` (i1) over the warpgroup (one
        ``bar.red.or.pred`` on the warpgroup's barrier): the same boolean in every thread."""
        if self._no_sync:  # timing ablation: no barrier, so the thread's own flag
            return flag
        i32 = _i32()
        nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)
        asm = ("{\n .reg .pred pin, pout;\n setp.ne.u32 pin, $1, 0;\n"
               " bar.red.or.pred pout, $2, 128, pin;\n selp.u32 $0, 1, 0, pout;\n}")
        r = llvm.inline_asm(i32, [arith.extui(i32, flag.v), mu.warpgroup_barrier_idx(sync=False)],
                            asm, "=r,r,r", has_side_effects=True)
        return _B(arith.cmpi(arith.CmpIPredicate.ne, r, _c(0)))

    def cond(self, pred, if_true, if_false, n: int):
        """``if_true()`` or ``if_false()`` (each n f32 values) on a uniform i1: one scf.if.
        Pointers first taken inside a side stay local to it."""
        f32 = ir.F32Type.get()
        op = scf.IfOp(pred.v, [f32] * n, has_else=True)
        saved = dict(self._ptrs)
        for block, fn in ((op.then_block, if_true), (op.else_block, if_false)):
            self._ptrs = dict(saved)
            with ir.InsertionPoint(block):
                vals = fn()
                if len(vals) != n:
                    raise AssertionError(f"a side of cond returned {len(vals)} values, not {n}")
                scf.yield_([_F._v(v) for v in vals])
        self._ptrs = saved
        return [_F(r) for r in op.results]

    # -------------------------------------------------------------- registers
    @staticmethod
    def frag(kind, shape, regs, dtype="bf16"):
        layout = fa.WGMMA_LAYOUT if kind == "wgmma" else fa.WGMMA_COL_LAYOUT
        if dtype == "e4m3":  # four 8-bit elements per register (the same register indices)
            layout = fa.WGMMA_LAYOUT_8BIT
        arr = np.empty(layout.registers_shape(shape), dtype=object)
        f32 = ir.F32Type.get()
        for idx, reg in regs.items():
            if isinstance(reg, tuple):
                reg = vector.from_elements(ir.VectorType.get((2,), f32), [_F._v(x) for x in reg])
            arr[_FULL_INDEX[kind](idx)] = reg
        if any(r is None for r in arr.flat):
            raise AssertionError(f"register array {kind}{shape} not fully built")
        return fa.FragmentedArray(_registers=arr, _layout=layout, _is_signed=None)

    @staticmethod
    def get(frag, idx, e):
        kind = "wgmma" if frag.layout == fa.WGMMA_LAYOUT else "col"
        if kind == "col" and frag.layout != fa.WGMMA_COL_LAYOUT:
            raise AssertionError(f"unexpected layout {frag.layout}")
        reg = frag.registers[_FULL_INDEX[kind](idx)]
        return _F(vector.extract(reg, dynamic_position=[],
                                 static_position=ir.DenseI64ArrayAttr.get([e])))


# ============================================================ Pallas skeleton
_WGMMA = plgpu.Layout.WGMMA
_COL = plgpu.Layout.WGMMA.reduce(0)
_SPLAT = plgpu.Layout.WG_SPLAT(())
_B_TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
# e4m3 keys: Qexp K-major ([NK, 32] per step: 8-bit wgmma B operands cannot be transposed)
_B8_TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))


def _sds(shape, dtype, layout):
    return plgpu.ShapeDtypeStruct(shape, dtype, layout=layout)


def _inline(arg_types, ret, fn, **ops_kw):
    return plgpu.inline_mgpu(arg_types=tuple(arg_types), return_type=ret)(
        lambda ctx, *args: fn(MlirOps(**ops_kw), *args))


def _scalar(x):
    return x.registers.flat[0]


def _loop_zero(i) -> "_I":
    """0 from the loop's block index (i >> 31, i < 2**31): opaque to LLVM and ptxas, so a
    value it is added to is rebuilt in every block instead of being hoisted out of the loop."""
    return _I(llvm.inline_asm(_i32(), [_I._v(i)], "shr.u32 $0, $1, 31;", "=r,r"))


def _wgmma_chain(acc, a_ops, b_ref, tiles, zero):
    """``acc + sum_t a_ops[t] @ b_ref[tiles[t]]`` as one fence, the wgmmas, one commit and
    one wait (``wgmma="inline"``).

    ``acc`` f32 [M, N] and each A operand bf16 [M, 16] in the WGMMA register layout (M a
    multiple of 64); ``b_ref`` the swizzled B buffer, ``[n, 16, N]`` before its tiling.
    Each wgmma's B descriptor is the buffer's base descriptor plus the tile's encoded offset
    plus ``zero`` (:func:`_loop_zero`), one add in the block: hoisted, ptxas keeps the 16
    descriptors of a block in ordinary registers and copies each back into uniform ones
    before its wgmma (results/round9b_sass.log.gz: ~80 of the loop's 756 instructions)."""
    i64 = ir.IntegerType.get_signless(64)
    bf16 = ir.BF16Type.get()
    b0 = mu.memref_slice(b_ref, 0)
    (desc, k_strides), _, fastest = mma_utils.create_descriptor(
        b0, swizzle=SWIZZLE, large_tile=(16, 16), group_size=(16, acc.shape[1]),
        logical_k_major=True, split_const=True)
    lo0, desc_const = desc  # the address field (i32) and the constant fields (an int)
    signed = desc_const - (1 << 64) if desc_const >> 63 else desc_const
    fields = llvm.ConstantOp(i64, ir.IntegerAttr.get(i64, signed)).result
    b_ty = ir.MemRefType(b_ref.type)
    tile_bytes = b_ty.get_strides_and_offset()[0][0] * mu.bytewidth(b_ty.element_type)
    base = arith.addi(lo0, _I._v(zero))
    acc32 = acc.to_layout(fa.WGMMA_LAYOUT_ACC_32BIT)
    fenced = fa.optimization_barrier(acc32, *a_ops)
    acc32, a_ops = fenced[0], fenced[1:]
    nvvm.wgmma_fence_aligned()
    regs = acc32.registers.copy()
    m_groups = acc.shape[0] // 64
    for a, t in zip(a_ops, tiles):
        lo = arith.addi(base, _c(mma_utils.encode_addr(t * tile_bytes)))
        d = llvm.or_(arith.extui(i64, lo), fields)
        for mi in range(m_groups):
            regs[mi:mi + 1] = mwgmma.wgmma_m64(
                regs[mi:mi + 1], a[mi * 64:(mi + 1) * 64], d, a_transpose=None,
                b_transpose=fastest != mma_utils.Dim.K, a_k_stride=None,
                b_k_stride=k_strides[1][0], n=acc.shape[1], swizzle=SWIZZLE,
                a_element_type=bf16, b_element_type=bf16)
    void = ir.Type.parse("!llvm.void")
    llvm.inline_asm(void, [], "wgmma.commit_group.sync.aligned;", "", has_side_effects=True)
    llvm.inline_asm(void, [], "wgmma.wait_group.sync.aligned 0;", "", has_side_effects=True)
    out = fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_ACC_32BIT, _is_signed=None)
    return out.to_layout(fa.WGMMA_LAYOUT)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static choices of one kernel build (see :func:`mgpu_decode_attention`)."""

    geo: Geometry
    blocks_per_split: int
    num_stages: int
    boxes: tuple[tuple[int, int], ...]  # (rows, width) per block array: see block_boxes
    explicit_barriers: bool = False
    pipeline: str = "emit"  # "emit": plgpu.emit_pipeline; "bulk": one arrive + bulk copies
    windows: str = "xla"  # "kernel": one extra program per (sequence, kv head); else "xla"
    sink: int = 0  # S
    window: int = 0  # R + G, the recent ring
    ablate: tuple[str, ...] = ()
    tail: str = "mask"  # value scales past a block's valid tokens: "mask" each block, "zero"
    chain_parts: int = 1  # each wgmma chain in this many waited parts (fewer live A registers)
    wgmma: str = "pallas"  # "pallas": plgpu.wgmma per step; "inline": _wgmma_chain
    rescale: str = "block"  # "block": the running maximum every block; "lazy": _lazy_max


_BLOCK_DTYPES = (jnp.uint32, jnp.bfloat16, jnp.bfloat16, jnp.uint32, jnp.bfloat16, jnp.bfloat16)


def _block_specs(geo: Geometry):
    """(rows per block, row width) of the six per-block arrays, in kernel order, in the
    cache's natural rows: key words [BT/P, KW], key scales and zeros [BT*ng/8, 8], value
    words [BT/cpw, D], value scales and zeros [BT/G, D]. OuterQ swaps the scales' shapes
    (keys [BT/G, D], values [BT*ng/8, 8]: the same elements per block)."""
    ng8 = geo.BT * geo.ng // 8
    per_token, per_group = (ng8, 8), (geo.BT // geo.G, geo.D)
    ks, vs = (per_group, per_token) if geo.outer else (per_token, per_group)
    return [(geo.BT // geo.P, geo.KW), ks, ks, (geo.BT // geo.cpw, geo.D), vs, vs]


def block_boxes(geo: Geometry, Tq: int, wide: bool) -> tuple[tuple[int, int], ...]:
    """The copy box (rows, width) of each per-block array.

    Each array's block is one contiguous run of its (sequence, kv head) slice, and the
    kernel addresses its shared-memory copy by flat offsets, so any row width that divides
    both the block and the whole slice gives the same bytes in the same places. ``wide``
    takes the widest such row (at most 256 elements, TMA's box limit): a 2-bit D 128 block's
    key scales then move as 2 rows of 512 bytes instead of 64 rows of 16 bytes (TMA moves a
    box row by row). Otherwise the cache's natural rows."""
    boxes = []
    for (rows, width), dt in zip(_block_specs(geo), _BLOCK_DTYPES):
        if wide:
            per_block, per_slice = rows * width, Tq * rows * width // geo.BT
            for w in (256, 128, 64, 32, 16):
                if w <= width:
                    break
                if per_block % w == 0 and per_slice % w == 0 and w * jnp.dtype(dt).itemsize % 16 == 0:
                    rows, width = per_block // w, w
                    break
        boxes.append((rows, width))
    return tuple(boxes)


def _mbarrier_init(ctx, bar, n: int):
    """n mbarriers of arrival count 1 (only the issuing thread arrives) in ``bar`` [n, 2] u32."""
    i64 = ir.IntegerType.get_signless(64)
    ptr = mu.memref_ptr(bar)
    pred = mu.single_thread_predicate(mu.ThreadSubset.WARPGROUP)
    for k in range(n):
        nvvm.mbarrier_init(mu.getelementptr(ptr, [k], i64), _c(1), predicate=pred)
    mu.inline_ptx("fence.mbarrier_init.release.cluster;", has_side_effects=True)
    mu.warpgroup_barrier()
    return ()


def _bulk_fetch(ctx, *args, boxes):
    """One thread registers the block's bytes on the slot's mbarrier (one arrive) and issues
    the six contiguous bulk copies; bytes past the end of an array are left undefined (the
    block math masks every token past the sequence)."""
    gmem, bufs, (bar, b, h, blk, slot) = args[:6], args[6:12], args[12:]
    idx = ir.IndexType.get()
    i64 = ir.IntegerType.get_signless(64)
    pred = mu.single_thread_predicate(mu.ThreadSubset.WARPGROUP)
    slot_v = _scalar(slot)
    base = mu.memref_ptr(bar)
    total = sum(r * w * jnp.dtype(dt).itemsize for (r, w), dt in zip(boxes, _BLOCK_DTYPES))
    nvvm.mbarrier_arrive_expect_tx(mu.getelementptr(base, [slot_v], i64), _c(total),
                                   predicate=pred)
    barrier = mu.BarrierRef(base, slot_v, _c(0), 1)
    b_i, h_i = (arith.index_cast(idx, _scalar(x)) for x in (b, h))
    for g, buf, (rows, _) in zip(gmem, bufs, boxes):
        row0 = arith.index_cast(idx, arith.muli(_scalar(blk), _c(rows)))
        ctx.async_copy(src_ref=g, dst_ref=mu.memref_slice(buf, arith.index_cast(idx, slot_v)),
                       gmem_slice=(b_i, h_i, mu.DynamicSlice(row0, rows)), barrier=barrier,
                       arrive=False, predicate=pred, oob_mode=OOBFillMode.UNDEFINED)
    return ()


def _mbarrier_wait(ctx, bar, slot, parity):
    i64 = ir.IntegerType.get_signless(64)
    ptr = mu.getelementptr(mu.memref_ptr(bar), [_scalar(slot)], i64)
    nvvm.mbarrier_try_wait_parity(ptr, _scalar(parity), _c(10_000_000))
    return ()


def _kernel(nq_ref,  # [B] int32: quantized tokens per sequence
            qexp_ref,  # [B*H*n_ksteps, 16, NK] bf16: expanded query (key MMA B operand)
            kconst_ref,  # [B, H, 2, NK] f32: koff, per-group query sums
            kw_ref,  # [B, H, Tq/P, KW] uint32: key codes, P tokens per row
            ks_ref,  # [B, H, Tq*ng/8, 8] bf16: key scales ([Tq, ng] row-major)
            kz_ref,  # [B, H, Tq*ng/8, 8] bf16: key zero-points
            vw_ref,  # [B, H, Tq/cpw, D] uint32: value codes packed along T
            vs_ref,  # [B, H, Tq/G, D] bf16: value scales
            vz_ref,  # [B, H, Tq/G, D] bf16: value zero-points
            qw_ref,  # [B, H, r*D] f32: q' * log2 e (window program)
            wvalid_ref,  # [B, S + R + G] int32: live window slots (window program)
            sk_ref, sv_ref,  # [B, H, S, D] bf16: sink window (S = 0: a [1, 1, 1, D] stand-in)
            rk_ref, rv_ref,  # [B, H, R + G, D] bf16: recent ring
            o_ref,  # out [B, H, NS(+1), D, NV] f32: partial outputs (M-row, column order)
            ml_ref,  # out [B, H, NS(+1), 2, NV] f32: partial running max and sum
            qexp_smem, kconst_smem, pexp_smem, xchg_smem, const_bar, *extra,
            kc: KernelConfig):
    geo = kc.geo
    s, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
    NS = o_ref.shape[2] - (1 if kc.windows == "kernel" else 0)
    if kc.windows == "kernel":
        wscr, extra = extra[0], extra[1:]

        @pl.when(s == NS)
        def _windows():
            wins = [(sk_ref.at[b, h], sv_ref.at[b, h], kc.sink)] if kc.sink else []
            wins.append((rk_ref.at[b, h], rv_ref.at[b, h], kc.window))
            refs = [r for k, v, _ in wins for r in (k, v)]
            ns = [n for _, _, n in wins]

            def fn(ops, q, valid, scr, oo, mo, *kv):
                ws = [(kv[2 * i], kv[2 * i + 1], n) for i, n in enumerate(ns)]
                blk.window_attention(ops, geo, q, ws, valid, scr, oo, mo)
                return ()

            ref = plgpu.RefType()
            _inline([ref] * (5 + len(refs)), (), fn)(
                qw_ref.at[b, h], wvalid_ref.at[b], wscr, o_ref.at[b, h, s], ml_ref.at[b, h, s],
                *refs)

    @pl.when(s < NS)
    def _quantized():
        _quantized_program(kc, s, h, b, nq_ref, qexp_ref, kconst_ref,
                           (kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref), o_ref, ml_ref,
                           qexp_smem, kconst_smem, pexp_smem, xchg_smem, const_bar, extra)


def _quantized_program(kc, s, h, b, nq_ref, qexp_ref, kconst_ref, gmem, o_ref, ml_ref,
                       qexp_smem, kconst_smem, pexp_smem, xchg_smem, const_bar, extra):
    """One split of the quantized region: online softmax over its blocks, partial written."""
    geo, ablate = kc.geo, kc.ablate
    BT, NV, D = geo.BT, geo.NV, geo.D
    pexp_t = plgpu.RefType(_B_TRANSFORMS)
    ref = plgpu.RefType()
    if geo.outer:  # the query table; Qexp and its constants are built in every block
        qtab_smem = extra[-1]
        plgpu.copy_gmem_to_smem(qexp_ref.at[b * o_ref.shape[1] + h], qtab_smem, const_bar)
        n_qexp = geo.n_ksteps * 16 * geo.NK  # columns past the heads' stay zero
        _inline([pexp_t], (), lambda ops, p: blk.zero_fill(ops, p, n_qexp) or ())(qexp_smem)
    else:
        # one copy per K step: a [16, NK] tile is the largest box TMA takes with the swizzle
        # (e4m3 keys: an [NK, 32] tile per step and half, hi and lo)
        n_tiles = qexp_smem.shape[0]
        base = (b * kconst_ref.shape[1] + h) * n_tiles
        for st in range(n_tiles):
            plgpu.copy_gmem_to_smem(qexp_ref.at[base + st], qexp_smem.at[st], const_bar)
        plgpu.copy_gmem_to_smem(kconst_ref.at[b, h], kconst_smem, const_bar)

    n_pexp = geo.NC * geo.half * 16 * NV
    _inline([pexp_t], (), lambda ops, p: blk.zero_fill(ops, p, n_pexp) or ())(pexp_smem)

    def init_state(ops):
        col = {(t8,): (ops.f32(NEG), ops.f32(NEG)) for t8 in range(NV // 8)}
        zc = {(t8,): (ops.f32(0.0), ops.f32(0.0)) for t8 in range(NV // 8)}
        zo = {(mv, t8, r): (ops.f32(0.0), ops.f32(0.0))
              for mv in range(geo.MV) for t8 in range(NV // 8) for r in range(2)}
        return (ops.frag("col", (NV,), col, "f32"), ops.frag("col", (NV,), zc, "f32"),
                ops.frag("wgmma", (D, NV), zo, "f32"))

    state_ty = (_sds((NV,), jnp.float32, _COL), _sds((NV,), jnp.float32, _COL),
                _sds((D, NV), jnp.float32, _WGMMA))
    init = _inline([], state_ty, init_state)()
    plgpu.barrier_wait(const_bar)
    acc_k_ty = _sds((64 * geo.MT, geo.NK), jnp.float32, _WGMMA)
    k_init = lambda: _inline([ref], acc_k_ty, lambda ops, kc_: blk.k_acc_init(ops, geo, kc_))(  # noqa: E731
        kconst_smem)
    acc_k_init = None if geo.outer else k_init()

    nq = nq_ref[b]
    bps = kc.blocks_per_split
    start = s * (bps * BT)
    n = jnp.clip(nq - start, 0, bps * BT)
    nblk = lax.div(n + (BT - 1), BT)
    blk0 = s * bps

    k_op_ty = (_sds((64 * geo.MT, 32), jnp.float8_e4m3fn, plgpu.Layout.WGMMA_8BIT) if geo.e4m3
               else _sds((64 * geo.MT, 16), jnp.bfloat16, _WGMMA))
    v_op_ty = _sds((D, 16), jnp.bfloat16, _WGMMA)
    col_ty = _sds((NV,), jnp.float32, _COL)
    # InnerQ's softmax step: (m, l, o_full, poffs, psums); OuterQ's: (m, l, alpha, poffs, zsum)
    step_ty = (col_ty, col_ty, _sds((D, NV), jnp.float32, _WGMMA), (col_ty,) * geo.NC,
               (col_ty,) * geo.NC)
    outer_step_ty = (col_ty, col_ty, col_ty, (col_ty,) * geo.NC, col_ty)

    zero_tail = kc.tail == "zero"

    def softmax(ops, acc_k, ks, kz, kc_, m_cols, l_cols, o_full, n_valid, xchg, pexp, *vs_vz):
        m_new, l_new, o_full, poffs, psums = blk.softmax_step(
            ops, geo, acc_k, ks, kz, kc_, m_cols, l_cols, o_full, _I(_scalar(n_valid)), xchg,
            pexp, tail=vs_vz if zero_tail else None, lazy=kc.rescale == "lazy")
        return m_new, l_new, o_full, tuple(poffs), tuple(psums)

    def outer_softmax(ops, acc_k, vs, vz, m_cols, l_cols, n_valid, xchg, pexp):
        m_new, alpha, poffs, psum, zsum = blk.outer_softmax_step(
            ops, geo, acc_k, vs, vz, m_cols, _I(_scalar(n_valid)), xchg, pexp)
        l_regs = {(t8,): tuple(ops.get(l_cols, (t8,), e) * ops.get(alpha, (t8,), e)
                               + ops.get(psum, (t8,), e) for e in range(2))
                  for t8 in range(NV // 8)}
        return m_new, ops.frag("col", (NV,), l_regs, "f32"), alpha, tuple(poffs), zsum

    def value_chain(poff, vw_s, ck, idx):
        """V chunk ck's accumulator: -128 * poff (the codes' offset), then the chain of its
        code pairs against Pexp (in kc.chain_parts waited parts; kc.wgmma's form)."""
        acc_v = _inline([_COL], _sds((D, NV), jnp.float32, _WGMMA),
                        lambda ops, po: blk.v_acc_init(ops, geo, po))(poff)
        for js in _parts(geo.half, kc.chain_parts):
            if kc.wgmma == "inline":
                acc_v = _inline(
                    [_WGMMA, ref, pexp_t, _SPLAT], _sds((D, NV), jnp.float32, _WGMMA),
                    lambda ops, acc, vw, px, i, js=js: _wgmma_chain(
                        acc, blk.v_operands(ops, geo, vw, ck, js), px,
                        [ck * geo.half + j for j in js], _loop_zero(_I(_scalar(i)))))(
                    acc_v, vw_s, pexp_smem, idx[0])
                continue
            a_v = _inline([ref], (v_op_ty,) * len(js), lambda ops, vw, js=js: tuple(
                blk.v_operands(ops, geo, vw, ck, js)))(vw_s)

            def v_chain(acc_ref, a_v=a_v, js=js):
                for a, j in zip(a_v, js):
                    plgpu.wgmma(acc_ref, a, pexp_smem.at[ck * geo.half + j])

            acc_v = pl.run_state(v_chain)(plgpu.ACC.init(acc_v))
        return acc_v

    def body(idx, kw_s, ks_s, kz_s, vw_s, vs_s, vz_s, carry):
        m_cols, l_cols, o_full = carry
        if "stream" in ablate:  # timing ablation: the pipeline's copies alone
            return carry
        n_valid = n - idx[0] * BT
        if geo.outer:  # this block's Qexp (the key scales folded into q) and constants
            _inline([ref, ref, ref, pexp_t, ref], (), lambda ops, qt, ks, kz, qx, kc_: blk.outer_key_operand(
                ops, geo, qt, ks, kz, qx, kc_) or ())(qtab_smem, ks_s, kz_s, qexp_smem, kconst_smem)
        # the key chain in kc.chain_parts parts, each waited for before the next one's
        # operands are unpacked (fewer A registers live at once)
        acc_k = k_init() if geo.outer else acc_k_init
        # (e4m3 keys: each step's codes against the hi and the lo table, two wgmmas per step)
        k_operands = blk.k_operands8 if geo.e4m3 else blk.k_operands
        for stp in _parts(geo.k_steps, kc.chain_parts):
            if kc.wgmma == "inline":  # bf16 keys only (prepare_call)
                acc_k = _inline(
                    [_WGMMA, ref, pexp_t, _SPLAT], _sds((64 * geo.MT, geo.NK), jnp.float32, _WGMMA),
                    lambda ops, acc, kw, qx, i, stp=stp: _wgmma_chain(
                        acc, blk.k_operands(ops, geo, kw, stp), qx, stp,
                        _loop_zero(_I(_scalar(i)))))(acc_k, kw_s, qexp_smem, idx[0])
                continue
            a_k = _inline([ref], (k_op_ty,) * len(stp), lambda ops, kw, stp=stp: tuple(
                k_operands(ops, geo, kw, stp)))(kw_s)

            def k_chain(acc_ref, a_k=a_k, stp=stp):
                for a, st in zip(a_k, stp):
                    if geo.e4m3:
                        for half in range(2):
                            plgpu.wgmma(acc_ref, a, qexp_smem.at[2 * st + half].transpose((1, 0)))
                    else:
                        plgpu.wgmma(acc_ref, a, qexp_smem.at[st])

            acc_k = pl.run_state(k_chain)(plgpu.ACC.init(acc_k))
        if geo.outer:
            return _outer_values(acc_k, vw_s, vs_s, vz_s, m_cols, l_cols, o_full, n_valid, idx)
        tail_refs = (vs_s, vz_s) if zero_tail else ()
        # the online softmax's whole update: o_full comes back multiplied by alpha
        m_new, l_new, o_full, poffs, psums = _inline(
            [_WGMMA, ref, ref, ref, _COL, _COL, _WGMMA, _SPLAT, ref, pexp_t]
            + [ref] * len(tail_refs), step_ty, softmax, no_sync="no_sync" in ablate)(
            acc_k, ks_s, kz_s, kconst_smem, m_cols, l_cols, o_full, n_valid, xchg_smem,
            pexp_smem, *tail_refs)
        # tail="mask": groups past n_valid masked in every block; "zero": their scales were
        # zeroed in shared memory by the softmax step (stores predicated off but in the last)
        nv_args, nv_types = ((), []) if zero_tail else ((n_valid,), [_SPLAT])

        def epi(ops, o, a, vs, vz, ps, *nv_, ck):
            nv = _I(_scalar(nv_[0])) if nv_ else None
            return blk.v_epilogue(ops, geo, o, a, vs, vz, ps, nv, ck)

        for ck in range(geo.NC if "keys_only" not in ablate else 0):
            acc_v = value_chain(poffs[ck], vw_s, ck, idx)
            o_full = _inline(
                [_WGMMA, _WGMMA, ref, ref, _COL] + nv_types,
                _sds((D, NV), jnp.float32, _WGMMA), functools.partial(epi, ck=ck))(
                o_full, acc_v, vs_s, vz_s, psums[ck], *nv_args)
        return m_new, l_new, o_full

    def _outer_values(acc_k, vw_s, vs_s, vz_s, m_cols, l_cols, o_full, n_valid, idx):
        """The OuterQ block after its key chain: softmax step, value chains, epilogue."""
        m_new, l_new, alpha, poffs, zsum = _inline(
            [_WGMMA, ref, ref, _COL, _COL, _SPLAT, ref, pexp_t], outer_step_ty, outer_softmax,
            no_sync="no_sync" in ablate)(
            acc_k, vs_s, vz_s, m_cols, l_cols, n_valid, xchg_smem, pexp_smem)
        for ck in range(geo.NC if "keys_only" not in ablate else 0):
            acc_v = value_chain(poffs[ck], vw_s, ck, idx)
            first = ck == 0  # alpha and the zero term once per block
            o_full = _inline(
                [_WGMMA, _WGMMA] + [_COL, _COL] * first, _sds((D, NV), jnp.float32, _WGMMA),
                lambda ops, o, a, *za: blk.outer_v_epilogue(
                    ops, geo, o, a, za[0] if za else None, za[1] if za else None))(
                o_full, acc_v, *((zsum, alpha) if first else ()))
        return m_new, l_new, o_full

    barrier = lambda: _inline([], (), lambda ops: ops.barrier() or ())()  # noqa: E731
    gmem_bh = [g.at[b, h] for g in gmem]
    if kc.pipeline == "emit":
        def emit_body(idx, *slots_and_carry):
            out = body(idx, *slots_and_carry)
            if kc.explicit_barriers:  # every thread is done with the slot before it is refilled
                barrier()
            return out

        specs = [plgpu.BlockSpec(box, lambda i: (blk0 + i, 0)) for box in kc.boxes]
        m_cols, l_cols, o_full = plgpu.emit_pipeline(
            emit_body, grid=(nblk,), in_specs=specs, max_concurrent_steps=kc.num_stages,
            init_carry=init)(*gmem_bh)
    else:
        bufs, bar = extra[:6], extra[6]
        stages = kc.num_stages
        _inline([ref], (), lambda ops, br: _mbarrier_init(None, br, stages))(bar)
        fetch_ty = [ref] * 13 + [_SPLAT] * 4

        def fetch(i, slot):
            plgpu.inline_mgpu(arg_types=tuple(fetch_ty), return_type=())(
                functools.partial(_bulk_fetch, boxes=kc.boxes))(*gmem, *bufs, bar, b, h, blk0 + i, slot)

        for k in range(stages):
            pl.when(k < nblk)(functools.partial(fetch, jnp.int32(k), jnp.int32(k)))

        def loop_body(i, carry):
            slot = lax.rem(i, stages)
            parity = lax.rem(lax.div(i, stages), 2)
            plgpu.inline_mgpu(arg_types=(ref, _SPLAT, _SPLAT), return_type=())(_mbarrier_wait)(
                bar, slot, parity)
            carry = body((i,), *(buf.at[slot] for buf in bufs), carry)
            barrier()  # every thread is done with the slot before it is refilled
            pl.when(i + stages < nblk)(lambda: fetch(i + stages, slot))
            return carry

        m_cols, l_cols, o_full = lax.fori_loop(0, nblk, loop_body, init)
    _inline([_WGMMA, _COL, _COL, ref, ref], (),
            lambda ops, o, m, l_, oo, mo: blk.store_partials(ops, geo, o, m, l_, oo, mo) or ())(
        o_full, m_cols, l_cols, o_ref.at[b, h, s], ml_ref.at[b, h, s])


ABLATIONS = ("stream", "keys_only", "no_sync")  # timing only: their outputs are wrong


def _parts(n: int, parts: int) -> list[list[int]]:
    """0 .. n-1 in ``parts`` consecutive runs (as even as they divide)."""
    return [list(range(i * n // parts, (i + 1) * n // parts)) for i in range(parts)]


@functools.lru_cache(maxsize=64)
def _build_kernel(kc: KernelConfig, B: int, H: int, NS: int):
    geo = kc.geo
    kernel = functools.partial(_kernel, kc=kc)
    NP = NS + (1 if kc.windows == "kernel" else 0)
    out_type = (jax.ShapeDtypeStruct((B, H, NP, geo.D, geo.NV), jnp.float32),
                jax.ShapeDtypeStruct((B, H, NP, 2, geo.NV), jnp.float32))
    qexp_buf = (plgpu.SMEM((2 * geo.n_ksteps8, geo.NK, 32), jnp.float8_e4m3fn,
                           transforms=_B8_TRANSFORMS) if geo.e4m3 else
                plgpu.SMEM((geo.n_ksteps, 16, geo.NK), jnp.bfloat16, transforms=_B_TRANSFORMS))
    scratch = [
        qexp_buf,
        plgpu.SMEM((geo.kconst_rows, geo.NK), jnp.float32),
        plgpu.SMEM((geo.NC * geo.half, 16, geo.NV), jnp.bfloat16, transforms=_B_TRANSFORMS),
        plgpu.SMEM((geo.xchg_size,), jnp.float32),
        plgpu.Barrier(num_arrivals=1 if geo.outer else qexp_buf.shape[0] + 1),
    ]
    if kc.windows == "kernel":
        n_win = blk.window_scratch_size(geo, kc.sink + kc.window)
        scratch.append(plgpu.SMEM((n_win,), jnp.float32))
    if kc.pipeline == "bulk":
        scratch += [plgpu.SMEM((kc.num_stages, *box), dt)
                    for box, dt in zip(kc.boxes, _BLOCK_DTYPES)]
        scratch.append(plgpu.SMEM((kc.num_stages, 2), jnp.uint32))  # the slots' mbarriers
    if geo.outer:  # the query table, last
        scratch.append(plgpu.SMEM((geo.NR, geo.D), jnp.float32))
    no_auto = kc.explicit_barriers or kc.pipeline == "bulk"
    return plgpu.kernel(
        kernel, out_type=out_type, grid=(NP, H, B), grid_names=("s", "h", "b"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                             unsafe_no_auto_barriers=no_auto),
        kernel_name=f"{geo.layout}{geo.bits}_mgpu_decode")


# ================================================================ XLA parts
def query_operands(qp: jax.Array, geo: Geometry):
    """qp [B, H, r, D] f32 -> (Qexp [B, H, n_ksteps, 16, NK] bf16, kconst [B, H, 2, NK] f32).

    Scores come out in log2 units (q times log2 e), for exp2 in the kernel.
    """
    q = qp.astype(jnp.float32) * LOG2E
    head, chan, fac = geo.qexp_tables
    # koff must be the sum of exactly the bf16 values the MMA multiplies: it cancels the
    # codes' +128 offset, 128x amplified. An explicit reduce_precision, because XLA on GPU
    # drops an f32 -> bf16 -> f32 round trip under jit (excess precision allowed).
    qexp_f = lax.reduce_precision(q[:, :, head, chan] * fac, exponent_bits=8, mantissa_bits=7)
    qexp = qexp_f.astype(jnp.bfloat16)
    koff = 128.0 * jnp.sum(qexp_f, axis=(2, 3))
    qh, qg, ok = geo.qsum_tables
    qgs = jnp.sum(q.reshape(*q.shape[:3], geo.ng, geo.G), axis=-1)  # [B, H, r, ng]
    qsum = jnp.where(ok, qgs[:, :, qh, qg], 0.0)
    return qexp, jnp.stack([koff, qsum], axis=2)


def query_operands8(qp: jax.Array, geo: Geometry):
    """``key_format="e4m3x2"``: qp [B, H, r, D] f32 -> (Qexp [B, H, 2 n_ksteps8, NK, 32]
    float8_e4m3fn, kconst [B, H, 4, NK] f32).

    Qexp holds each step's table twice, hi (step 2s) and lo (2s + 1): x = q * log2 e * fac
    times a power of two per query head that puts the head's largest |x| in [64, 128), hi =
    e4m3(x), lo = e4m3(x - hi), so that hi + lo keeps about eight bits of x; the kernel feeds
    the same A registers to both. kconst: koff = 8 x the sum of exactly the e4m3 values (the
    codes' +8 offset), the per-group query sums times the column's scale, 1 / the scale
    (applied once per score) and zeros (the copy's 128-byte multiple).
    """
    if not geo.e4m3:
        raise ValueError(f"query_operands8 builds the e4m3 keys' operands; the geometry has "
                         f"key_format={geo.key_format!r} (query_operands builds those)")
    q = qp.astype(jnp.float32) * LOG2E
    head, chan, fac = geo.qexp8_tables
    qh, qg, ok = geo.qsum_tables
    x = q[:, :, head, chan] * fac  # [B, H, n8, NK, 32]
    # one scale per query head (all its columns: a score sums its groups' columns)
    top = jnp.max(jnp.abs(q), axis=-1)  # [B, H, r] (the levels' factors are 1 and 1/2)
    scale_h = e4m3_head_scale(top, jnp)
    scale = jnp.where(ok, scale_h[:, :, qh], 1.0)  # [B, H, NK]
    x = x * scale[:, :, None, :, None]
    # the barriers keep XLA from folding an f32 -> e4m3 -> f32 round trip (excess precision)
    hi8 = lax.optimization_barrier(x.astype(jnp.float8_e4m3fn))
    hi = hi8.astype(jnp.float32)
    lo8 = lax.optimization_barrier((x - hi).astype(jnp.float8_e4m3fn))
    lo = lo8.astype(jnp.float32)
    koff = E4M3_OFFSET * jnp.sum(hi + lo, axis=(2, 4))
    qgs = jnp.sum(q.reshape(*q.shape[:3], geo.ng, geo.G), axis=-1)  # [B, H, r, ng]
    qsum = jnp.where(ok, qgs[:, :, qh, qg], 0.0) * scale
    B, H = q.shape[:2]
    qexp = jnp.stack([hi8, lo8], axis=3).reshape(B, H, 2 * geo.n_ksteps8, geo.NK, 32)
    return qexp, jnp.stack([koff, qsum, 1.0 / scale, jnp.zeros_like(koff)], axis=2)


def outer_query_table(qp: jax.Array, geo: Geometry) -> jax.Array:
    """qp [B, H, r, D] -> the OuterQ kernel's query table [B*H, NR, D] f32: q * log2 e, zero
    rows past r (the kernel folds each block's key scales into it)."""
    B, H, r, D = qp.shape
    q = qp.astype(jnp.float32) * LOG2E
    q = jnp.pad(q, ((0, 0), (0, 0), (0, geo.NR - r), (0, 0)))
    return q.reshape(B * H, geo.NR, D)


def window_operands(qp, layer: QuantLayer, lengths, cfg: CacheConfig):
    """(q' [B, H, r*D] f32 (a free reshape; the window program scales it by log2 e), live
    mask [B, S + R + G] int32) for the window program: the ring's live slots come from the
    layout's own accessor."""
    B, H, r, D = qp.shape
    sizes = region_sizes(lengths, cfg)
    _, live = recent_slot_tokens(lengths, cfg)
    valid = jnp.concatenate([jnp.arange(cfg.sink)[None, :] < sizes.sink[:, None], live], axis=-1)
    return qp.astype(jnp.float32).reshape(B, H, r * D), valid.astype(jnp.int32)


def window_partial(qp, layer: QuantLayer, lengths, cfg: CacheConfig):
    """Online-softmax partial (o [B,H,r,D], m [B,H,r], l [B,H,r]) of the bf16 sink and
    recent windows in XLA, in log2 units like the kernel's (``windows="xla"``)."""
    q = qp.astype(jnp.float32) * LOG2E
    _, valid = window_operands(qp, layer, lengths, cfg)
    valid = valid.astype(bool)
    k = jnp.concatenate([layer.sink_k, layer.recent_k], axis=2).astype(jnp.float32)
    v = jnp.concatenate([layer.sink_v, layer.recent_v], axis=2).astype(jnp.float32)
    s = jnp.einsum("bhrd,bhtd->bhrt", q, k, precision=lax.Precision.HIGHEST)
    s = jnp.where(valid[:, None, None, :], s, NEG)
    m = jnp.max(s, axis=-1)
    p = jnp.where(valid[:, None, None, :], jnp.exp2(s - m[..., None]), 0.0)
    o = jnp.einsum("bhrt,bhtd->bhrd", p, v, precision=lax.Precision.HIGHEST)
    return o, m, jnp.sum(p, axis=-1)


def combine_partials(o_part, ml_part, window, geo: Geometry):
    """Merges the kernel's partials (column order, see mgpu_geometry) and, if given, an
    XLA window partial: o = sum_s w_s o_s / sum_s w_s l_s with w_s = 2**(m_s - max m);
    0 where nothing is held."""
    cols, rows = geo.combine_tables
    o_s = jnp.sum(o_part[..., rows, :][..., cols], axis=-1)  # [B, H, NS, D, r]
    o_s = jnp.swapaxes(o_s, -1, -2)  # [B, H, NS, r, D]
    m_s = ml_part[:, :, :, 0, cols[:, 0]]  # [B, H, NS, r]
    l_s = jnp.sum(ml_part[:, :, :, 1][..., cols], axis=-1)
    if window is not None:
        o_w, m_w, l_w = window
        m_s = jnp.concatenate([m_s, m_w[:, :, None]], axis=2)
        l_s = jnp.concatenate([l_s, l_w[:, :, None]], axis=2)
        o_s = jnp.concatenate([o_s, o_w[:, :, None]], axis=2)
    mx = jnp.max(m_s, axis=2, keepdims=True)
    wgt = jnp.exp2(m_s - mx)
    l_tot = jnp.sum(wgt * l_s, axis=2)
    o_tot = jnp.sum(wgt[..., None] * o_s, axis=2)
    # zero only where nothing is held; a NaN l_tot (non-finite key or value) stays NaN
    empty = l_tot[..., None] == 0
    return jnp.where(empty, 0.0, o_tot / jnp.where(empty, 1.0, l_tot[..., None]))


def kernel_operands(layer: QuantLayer, geo: Geometry, boxes=None) -> list[jax.Array]:
    """The quantized region in the kernel's views (free reshapes of the cache layout): each
    array as [B, H, rows, width] with the widths of ``boxes`` (:func:`block_boxes`; default
    the cache's natural rows)."""
    k, v = layer.k, layer.v
    want = ("t", "d", "d", "t") if geo.outer else ("d", "d", "t", "t")
    if (k.grouping, k.packing, v.grouping, v.packing) != want:
        name = ("OuterQ layout (K grouped along T, V along D" if geo.outer
                else "InnerQ layout (K grouped along D, V along T")
        raise ValueError(
            f"the Mosaic GPU kernel's geometry needs the {name}; codes packed K along D, V "
            f"along T); got K {k.grouping}/{k.packing}, V {v.grouping}/{v.packing}")
    B, H, Tq, _ = k.codes.shape
    if Tq % geo.G:
        raise ValueError(f"quant_capacity={Tq} must be a multiple of G={geo.G}")
    boxes = boxes or block_boxes(geo, Tq, wide=False)
    arrays = [k.codes, k.scale, k.zero, v.codes, v.scale, v.zero]
    return [x.reshape(B, H, x[0, 0].size // w, w) for x, (_, w) in zip(arrays, boxes)]


def default_num_splits(B: int, H: int, n_blocks: int, ctas_per_sm: int, sms: int) -> int:
    """About ``ctas_per_sm`` programs per SM, and at least 2 blocks per program."""
    return int(max(1, min(-(-n_blocks // 2), round(ctas_per_sm * sms / (B * H)))))


class PreparedCall(NamedTuple):
    """What :func:`prepare_call` resolves and builds: ``call(*operands)`` gives the
    partials (o_part, ml_part)."""

    call: Callable
    operands: tuple
    geo: Geometry
    windows: str  # where the windows and the merge run (WINDOWS)
    finish: str  # where a value rotation is undone (FINISH)
    qp: jax.Array  # [B, H, r, D] f32: q', the query the windows take


def prepare_call(qp, layer: QuantLayer, lengths, cfg: CacheConfig, *, block_tokens=None,
                 num_splits=None, num_stages=None, ctas_per_sm=None, explicit_barriers=None,
                 pipeline=None, windows=None, wide_copies=None, query=None, tail=None,
                 chain_parts=None, wgmma=None, finish=None, key_format=None, rescale=None,
                 ablate=(), prep=None) -> PreparedCall:
    """Resolves every option (the device's tuned defaults where not given) and builds the
    kernel: a :class:`PreparedCall`. Options: see :func:`mgpu_decode_attention`."""
    _check_jax_version()
    if cfg.kind not in ("innerq", "outerq"):
        raise ValueError(f"mgpu_decode_attention implements the InnerQ and OuterQ layouts, got "
                         f"cfg.kind={cfg.kind!r}")
    outer = cfg.kind == "outerq"
    tuned = tuned_defaults()
    key_format = key_format or ("bf16" if outer else tuned.get("key_format", "bf16"))
    if key_format not in KEY_FORMATS:
        raise ValueError(f"key_format={key_format!r}; choose one of {KEY_FORMATS}")
    if key_format == "e4m3x2":  # its chains are plgpu.wgmma's
        if wgmma not in (None, "pallas"):
            raise ValueError(f"wgmma={wgmma!r}: key_format='e4m3x2' takes wgmma in ('pallas',)")
        wgmma = "pallas"
    if outer:  # options with an InnerQ-only form
        given = dict(query=query, windows=windows, tail=tail, chain_parts=chain_parts,
                     wgmma=wgmma, key_format=key_format, rescale=rescale)
        allowed = dict(query=("xla",), windows=("xla", "epilogue"), tail=("mask",),
                       chain_parts=(1,), wgmma=("pallas",), key_format=("bf16",),
                       rescale=("block",))
        for k, v in given.items():
            if v is not None and v not in allowed[k]:
                raise ValueError(f"{k}={v!r}: the OuterQ kernel takes {k} in {allowed[k]}")
        query, tail, chain_parts, wgmma, rescale = "xla", "mask", 1, "pallas", "block"
    B, H, r, D = qp.shape
    if layer.k_scale.shape != (B, H, D):
        raise ValueError(f"qp {qp.shape} does not match the cache (k_scale {layer.k_scale.shape})")
    BT = block_tokens or tuned["block_tokens"] or default_block_tokens(cfg.bits, cfg.group_size, D)
    stages = num_stages or tuned["num_stages"]
    if explicit_barriers is None:
        explicit_barriers = tuned.get("explicit_barriers", False)
    pipeline = pipeline or tuned.get("pipeline", "emit")
    windows = windows or tuned.get("windows", "xla")
    if wide_copies is None:
        wide_copies = tuned.get("wide_copies", False)
    if not isinstance(wide_copies, bool):
        raise ValueError(f"wide_copies={wide_copies!r}; choose True or False")
    query = query or tuned.get("query", "xla")
    if query not in QUERY:
        raise ValueError(f"query={query!r}; choose one of {QUERY}")
    tail = tail or tuned.get("tail", "mask")
    if tail not in TAIL:
        raise ValueError(f"tail={tail!r}; choose one of {TAIL}")
    chain_parts = chain_parts or tuned.get("chain_parts", 1)
    wgmma = wgmma or tuned.get("wgmma", "pallas")
    if wgmma not in WGMMA:
        raise ValueError(f"wgmma={wgmma!r}; choose one of {WGMMA}")
    if pipeline not in ("emit", "bulk"):
        raise ValueError(f"pipeline={pipeline!r}; choose 'emit' or 'bulk'")
    barrier_per_block = pipeline == "bulk" or bool(explicit_barriers)
    if rescale is None:  # the tuned choice where this build has the barrier it needs
        rescale = tuned.get("rescale", "block") if barrier_per_block else "block"
    if rescale not in RESCALE:
        raise ValueError(f"rescale={rescale!r}; choose one of {RESCALE}")
    if rescale == "lazy" and not barrier_per_block:
        # a block's Pexp and exchange stores come before its first barrier: the barrier that
        # ends the previous block must order them after every thread's reads of that block
        raise ValueError("rescale='lazy' needs a barrier between blocks: explicit_barriers=True "
                         "or pipeline='bulk'")
    if windows not in WINDOWS:
        raise ValueError(f"windows={windows!r}; choose one of {WINDOWS}")
    finish = finish or tuned.get("finish", "xla")
    if finish not in FINISH:
        raise ValueError(f"finish={finish!r}; choose one of {FINISH}")
    if finish == "kernel" and windows != "epilogue":
        raise ValueError(f"finish='kernel' is the epilogue's (windows='epilogue'), got "
                         f"windows={windows!r}")
    bad = sorted(set(ablate) - set(ABLATIONS))
    if bad:
        raise ValueError(f"ablate={ablate!r}: unknown {bad}; allowed {ABLATIONS}")
    geo = Geometry(cfg.bits, cfg.group_size, D, r, BT, cfg.kind, key_format)
    geo.validate()
    if chain_parts not in (1, 2, 4) or chain_parts > min(geo.k_steps, geo.half):
        raise ValueError(f"chain_parts={chain_parts!r}; choose 1, 2 or 4, at most "
                         f"{min(geo.k_steps, geo.half)} for this geometry")
    Tq = cfg.quant_capacity
    n_blocks = max(1, -(-Tq // BT))
    if num_splits is None:
        sms = sm_count()
        if sms is None:
            raise ValueError("num_splits is required where the device reports no SM count")
        per_sm = ctas_per_sm or tuned["ctas_per_sm_outerq" if outer else "ctas_per_sm"]
        num_splits = default_num_splits(B, H, n_blocks, per_sm, sms)
    bps = -(-n_blocks // num_splits)
    NS = -(-n_blocks // bps)
    lengths = jnp.asarray(lengths, jnp.int32)
    if query == "kernel":  # q' and the quantized-token counts come from the same launch
        from pallas_kernels.mgpu_query import query_operands_kernel
        qexp, kconst, qp, nq = query_operands_kernel(qp, geo, layer, lengths, cfg, prep=prep)
    else:
        if prep is not None:
            qp = qprep.prepare_xla(qp, layer, cfg, prep)
        nq = region_sizes(lengths, cfg).quantized
        if outer:  # the query table (a stand-in for kconst, never read)
            qexp = kconst = outer_query_table(qp, geo)
        elif geo.e4m3:
            qexp, kconst = query_operands8(qp, geo)
        else:
            qexp, kconst = query_operands(qp, geo)
    if geo.e4m3:
        qexp = qexp.reshape(B * H * 2 * geo.n_ksteps8, geo.NK, 32)
    elif not outer:
        qexp = qexp.reshape(B * H * geo.n_ksteps, 16, geo.NK)
    sk, sv = layer.sink_k, layer.sink_v
    if cfg.sink == 0:  # a stand-in: the kernel never reads it
        sk, sv = layer.recent_k, layer.recent_v
    if windows == "kernel":
        qw, wvalid = window_operands(qp, layer, lengths, cfg)
    else:  # stand-ins the kernel never reads (building the real ones would cost launches)
        qw, wvalid = kconst, nq
    boxes = block_boxes(geo, Tq, wide_copies)
    kc = KernelConfig(geo, bps, stages, boxes, explicit_barriers=bool(explicit_barriers),
                      pipeline=pipeline, windows="kernel" if windows == "kernel" else "xla",
                      sink=cfg.sink, window=cfg.window, ablate=tuple(ablate), tail=tail,
                      chain_parts=chain_parts, wgmma=wgmma, rescale=rescale)
    call = _build_kernel(kc, B, H, NS)
    operands = (nq, qexp, kconst, *kernel_operands(layer, geo, boxes), qw, wvalid, sk, sv,
                layer.recent_k, layer.recent_v)
    return PreparedCall(call, operands, geo, windows, finish, qp)


def mgpu_decode_attention(
    qp: jax.Array,
    layer: QuantLayer,
    lengths: jax.Array,
    cfg: CacheConfig,
    *,
    prep: QueryPrep | None = None,
    **options,
) -> jax.Array:
    """Fused InnerQ (or OuterQ) decode attention on Mosaic GPU; f32 [B, Hkv, n_rep, D].

    qp [B, Hkv, n_rep, D] f32 (sigma, rotation and softmax scale folded in, see
    ``innerq_jax.reference.prepare_query``); lengths [B]. With ``prep``
    (:class:`pallas_kernels.query_prep.QueryPrep`), qp is the model's query heads instead
    (``split_heads(q, Hkv)``): the query kernel prepares q' (``query="kernel"``; XLA does
    otherwise) and the output comes back finished, in ``prep.out_dtype`` (the epilogue
    casts; a value rotation is undone in XLA, or with ``finish="kernel"`` in the epilogue's
    last program per (sequence, kv head)). Options (defaults from
    :data:`TUNED` for the device kind): ``block_tokens`` per pipeline step,
    ``num_stages`` blocks in flight, ``num_splits`` programs per (sequence, kv head)
    (default: ``ctas_per_sm`` programs per SM, the SM count read from the device),
    ``explicit_barriers`` (one warpgroup barrier per block instead of Pallas' automatic
    barrier before every copy), ``pipeline`` ("emit": ``plgpu.emit_pipeline``, whose copies
    arrive on the slot barrier from all 128 threads each; "bulk": one thread registers a
    block's bytes with one arrive and issues contiguous bulk copies), ``windows`` ("xla":
    an einsum pair and the merge in XLA; "kernel": one more program per (sequence, kv head),
    then the merge alone in one Triton launch; "epilogue": windows and merge in one Triton
    launch after the kernel), ``wide_copies``
    (each block array copied in rows as wide as divide it, at most 256 elements, instead of
    the cache's natural rows: 16 boxes of up to 1 KB instead of 260 rows of 16-512 bytes
    per 2-bit D 128 block; see :func:`block_boxes`), ``query`` ("xla": the query operands
    as XLA fusions; "kernel": one Triton launch, :mod:`pallas_kernels.mgpu_query`),
    ``tail`` ("mask": value scales past a block's valid tokens selected away in every
    block; "zero": zeroed in shared memory by stores predicated off but in a program's
    last block), ``chain_parts`` (1, 2 or 4: each wgmma chain in parts, each waited for
    before the next part's operands are unpacked, so fewer A registers are live), ``wgmma``
    ("pallas": ``plgpu.wgmma`` per step; "inline": each chain one inline block with one
    fence and one commit, its B descriptors rebuilt per block from one base), ``key_format``
    ("bf16": the key chain's operands as bf16 code pairs and a bf16 query table; "e4m3x2",
    2-bit InnerQ only: e4m3 codes, four per register, against the query table split into
    an e4m3 hi and lo part, two wgmmas per 32 channels into one accumulator: half the key
    A registers and, in exact arithmetic, about twice the bf16 table's precision; on the
    H200 its error was 1.6-2.3x lower in six of seven test cases and 2.2x higher in one (MHA,
    G 64: the e4m3 MMAs accumulate with fewer bits), level speed at B 8 / 32k, 0-4% slower
    at B 1 / 128k (benchmarks/KERNEL_NOTES.md, rounds 32 and 33); :func:`query_operands8`, or the
    query kernel's e4m3 form), ``rescale`` ("block": the online softmax's running maximum
    is the exact maximum after every block, reduced over the warpgroup (shuffles, an
    exchange and a barrier) before the block's probabilities; "lazy", InnerQ only: the
    probabilities are taken against the running maximum as it stands and the exact path
    runs only in a block where some score passes it by more than
    ``mgpu_block.LAZY_RESCALE`` (16, log2 units), a program's first block among them; the
    partials' maxima are then within that margin of the exact ones, which the merge takes as
    it takes any; it needs a barrier ending each block, ``explicit_barriers`` or the bulk
    pipeline; the H200's default, where that barrier is there: round 34 measured the kernel
    3% faster at B 8 / 32k, level at B 1 / 128k).
    ``ablate`` (benchmarks only; the output is then wrong):
    "stream" (the copies alone), "keys_only" (no value side), "no_sync" (no exchange
    barriers).
    """
    if prep is not None:
        qprep.check_query(qp, layer)
    call, operands, geo, windows, finish, qp = prepare_call(qp, layer, lengths, cfg,
                                                            prep=prep, **options)
    o_part, ml_part = call(*operands)
    if windows == "epilogue":
        from pallas_kernels.mgpu_epilogue import windows_and_merge
        # the epilogue's programs hold channel blocks: each casts its own; the value rotation
        # mixes all channels: XLA's after it, or its last program's per (sequence, kv head)
        in_kernel = prep is not None and cfg.rotate_values and finish == "kernel"
        cast = prep is not None and (not cfg.rotate_values or in_kernel)
        o = windows_and_merge(qp, layer, lengths, cfg, o_part, ml_part, geo,
                              out_dtype=prep.out_dtype if cast else None,
                              finish_values=in_kernel)
        return o if prep is None or cast else qprep.finish_xla(o, layer, cfg, prep)
    if windows == "kernel" and qp.shape[2] <= WINDOW_HEADS:  # the window program's partial
        from pallas_kernels.mgpu_epilogue import merge_partials  # is the last split
        o = merge_partials(o_part, ml_part, geo, qp.shape[2])
    else:
        window = None
        if windows == "xla":
            window = window_partial(qp, layer, jnp.asarray(lengths, jnp.int32), cfg)
        o = combine_partials(o_part, ml_part, window, geo)
    return o if prep is None else qprep.finish_xla(o, layer, cfg, prep)


def mgpu_decode_attention_reference(qp, layer, lengths, cfg):
    """The contract: innerq_jax.reference.quantized_attention_core."""
    return quantized_attention_core(qp, layer, lengths, cfg)


__all__ = ["ABLATIONS", "FINISH", "MlirOps", "QUERY", "RESCALE", "TAIL", "TUNED", "WGMMA", "block_boxes", "combine_partials", "default_num_splits",
           "kernel_operands", "mgpu_decode_attention", "mgpu_decode_attention_reference",
           "PreparedCall", "preferred", "prepare_call", "query_operands", "query_operands8", "sm_count", "tuned_defaults",
           "window_operands", "window_partial"]

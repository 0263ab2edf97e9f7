"""A numpy SIMT simulator for the per-thread code of ``pallas_kernels.mgpu_block``.

One warpgroup (128 threads) runs in lockstep: every value is a numpy array with
one entry per thread, so a store before ``barrier()`` is visible to every load
after it. Register arrays are modelled by their logical matrix and the Hopper
wgmma register layout that Mosaic GPU uses (``WGMMA_LAYOUT``: thread (warp w,
lane l) holds rows 16w + l//4 (+8) and columns 8*t8 + 2*(l%4) + {0, 1} of each
64-row tile; the 8-bit layout ``WGMMA_LAYOUT_8BIT`` of e4m3 arrays: the same rows and
columns 16*t + 4*(l%4) + {0..3}), so the simulator also checks that every register array the code
builds covers its matrix exactly once (or, for the column layout, consistently
replicated). Shared buffers are flat numpy arrays of their element type.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
N = 128


def bf16_round(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


class Frag:
    def __init__(self, kind, shape, mat):
        self.kind, self.shape, self.mat = kind, shape, mat


class SimOps:
    """The ``ops`` backend: integers are int64 arrays [128], floats float32 arrays [128]."""

    def __init__(self):
        tid = np.arange(N)
        lane = tid % 32
        self.w = tid // 32
        self.rr = lane // 4
        self.c = lane % 4
        self.branches = []  # cond's choices, in order (tests read which side ran)

    # ---------------------------------------------------------------- scalars
    @staticmethod
    def f32(x):
        return np.full(N, x, np.float32)

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b).astype(np.float32)

    @staticmethod
    def maximum(a, b):
        return np.maximum(a, b).astype(np.float32)

    @staticmethod
    def greater(a, b):
        return np.broadcast_to(np.asarray(a) > np.asarray(b), (N,)).copy()

    @staticmethod
    def exp2(x):
        with np.errstate(over="ignore", under="ignore"):
            return np.exp2(np.asarray(x, np.float32)).astype(np.float32)

    @staticmethod
    def imin(a, b):
        return np.minimum(a, b)

    @staticmethod
    def round_bf16(x):
        return bf16_round(x)

    def shfl_xor(self, x, d):
        x = np.broadcast_to(np.asarray(x), (N,))
        return x[np.arange(N) ^ d].copy()

    @staticmethod
    def and_or(x, mask, bits):
        return (np.asarray(x, np.int64) & mask) | bits

    def bf16x2(self, bits):
        bits = np.asarray(bits, np.int64).astype(np.uint32)
        lo = ((bits & 0xFFFF) << 16).view(np.float32)
        hi = (bits & 0xFFFF0000).view(np.float32)
        return (lo.copy(), hi.copy())

    def e4m3x4(self, bits):
        b = np.asarray(bits, np.int64).astype(np.uint32)
        return tuple(((b >> (8 * e)) & 0xFF).astype(np.uint8).view(E4M3).astype(np.float32)
                     for e in range(4))

    # ----------------------------------------------------------------- memory
    @staticmethod
    def _view(ref, kind):
        want = {"u32": np.uint32, "i32": np.int32, "bf16": BF16, "f32": np.float32}[kind]
        if ref.dtype != want:
            raise TypeError(f"access as {kind} to a {ref.dtype} buffer")
        return ref

    def load(self, ref, off, kind, n, keep=None):
        buf = self._view(ref, kind)
        if keep is not None and (kind != "bf16" or n % 2):  # as MlirOps.load
            raise NotImplementedError("keep= is implemented for bf16 pairs")
        off = np.broadcast_to(np.asarray(off, np.int64), (N,))
        if np.any(off % n):  # the kernel issues one n-element vector load: must be aligned
            raise AssertionError(f"misaligned {n}-element load")
        if np.any(off < 0) or np.any(off + n > buf.size):
            raise IndexError(f"load [{off.min()}, {off.max() + n}) out of {buf.size}")
        out = []
        for k in range(n):
            v = buf[off + k]
            out.append(v.astype(np.int64) if kind in ("u32", "i32") else v.astype(np.float32))
        if keep is not None:  # zeros where keep is false (the kernel selects whole words)
            out = [np.where(keep, v, 0).astype(v.dtype) for v in out]
        return out

    def store(self, ref, off, vals, kind, pred=None):
        buf = self._view(ref, kind)
        off = np.broadcast_to(np.asarray(off, np.int64), (N,))
        act = np.ones(N, bool) if pred is None else np.broadcast_to(np.asarray(pred), (N,))
        n = len(vals)
        if np.any(off[act] % n):
            raise AssertionError(f"misaligned {n}-element store")
        for k, v in enumerate(vals):
            v = np.broadcast_to(np.asarray(v), (N,))[act]
            idx = off[act] + k
            if np.any(idx < 0) or np.any(idx >= buf.size):
                raise IndexError("store out of bounds")
            # two threads writing one element must agree (the kernel relies on it)
            if len(np.unique(idx)) != len(idx):
                for i in np.unique(idx):
                    vv = v[idx == i]
                    if not np.all(vv.astype(np.float64) == float(vv[0])):
                        raise AssertionError("conflicting stores to one element")
            buf[idx] = v.astype(buf.dtype)

    def barrier(self):
        pass

    def fence_barrier(self):
        pass

    @staticmethod
    def fence_barrier_any(flag):
        return np.full(N, bool(np.any(flag)))

    def cond(self, pred, if_true, if_false, n):
        """The side ``pred`` picks; a predicate that differs between threads is an error
        (the sides hold barriers: a divergent branch would hang the warpgroup)."""
        p = np.broadcast_to(np.asarray(pred, bool), (N,))
        if not (p.all() or not p.any()):
            raise AssertionError("cond on a predicate that is not uniform over the warpgroup")
        self.branches.append(bool(p[0]))
        vals = (if_true if p[0] else if_false)()
        if len(vals) != n:
            raise AssertionError(f"a side of cond returned {len(vals)} values, not {n}")
        return [np.broadcast_to(np.asarray(v, np.float32), (N,)).copy() for v in vals]

    # -------------------------------------------------------------- registers
    def _coords(self, kind, idx, e, width=2):
        if kind == "wgmma":
            mt, t8, rho = idx
            return (64 * mt + 16 * self.w + self.rr + 8 * rho,
                    4 * width * t8 + width * self.c + e)
        (t8,) = idx
        return (8 * t8 + 2 * self.c + e,)

    def get(self, frag, idx, e):
        return frag.mat[self._coords(frag.kind, idx, e)].astype(np.float32)

    def frag(self, kind, shape, regs, dtype="bf16"):
        mat = np.full(shape, np.nan, np.float32)
        seen = np.zeros(shape, np.int64)
        width = 4 if dtype == "e4m3" else 2
        for idx, reg in regs.items():
            assert len(reg) == width, f"{dtype} register holds {width} elements"
            for e in range(width):
                coords = self._coords(kind, idx, e, width)
                v = np.broadcast_to(np.asarray(reg[e], np.float32), (N,))
                if kind == "col":  # replicated over rows: all owners must agree
                    (cc,) = coords
                    for col in np.unique(cc):
                        vv = v[cc == col]
                        same = vv.view(np.uint32) == vv[0].view(np.uint32)
                        assert np.all(same), "col layout disagrees"
                np.add.at(seen, coords, 1)
                mat[coords] = v
        expect = 1 if kind == "wgmma" else 32
        assert np.all(seen == expect), f"{kind} register array does not cover {shape} exactly"
        if dtype == "bf16":
            assert np.array_equal(bf16_round(mat), mat), "bf16 register holds a non-bf16 value"
        if dtype == "e4m3":
            assert np.array_equal(mat.astype(E4M3).astype(np.float32), mat), "not e4m3"
        return Frag(kind, shape, mat)


def wgmma(acc: Frag, a: Frag, b: np.ndarray) -> Frag:
    """acc + a @ b in float32 (a: register array [M, K] (bf16 K 16, e4m3 K 32), b: logical
    [K, N] of the same element type)."""
    out = acc.mat.astype(np.float64) + a.mat.astype(np.float64) @ b.astype(np.float64)
    return Frag("wgmma", acc.shape, out.astype(np.float32))

"""Static geometry of the Mosaic GPU decode kernel: tiles, MMA operand maps, tables.

``layout="outerq"`` gives the OuterQ (KIVI) form of the same tiles: key columns (head,
token group of the block) instead of (head, channel group), value columns (head, channel
group) instead of (head, token group of the V chunk); the A operands are unchanged.

Everything here is plain Python / numpy so that the CPU test suite checks it.
Names follow ``innerq_jax/layout.py``: a block of ``BT`` quantized tokens of one
(sequence, kv head) is processed per pipeline step.

Keys (InnerQ grouping ``d``, codes packed along D): one wgmma per (code pair j,
word tile T) with the *tokens on M*. A row of the A operand is a K row of ``KW``
words (``P`` tokens of ``nw`` words each; P = 2 only for 2-bit D = 64). A thread
of the Hopper wgmma register layout holds, for its two rows, A columns
(2c, 2c+1) and (2c+8, 2c+9) (c = lane % 4); those four bf16 come from words
2c and 2c+1 of the word tile by one ``lop3`` each (code j in the low half,
code j + cpw/2 in the high half, as the bf16 ``128 + code * 2**e_j``). So column
``a = 8t + 2c + i`` of step (j, T) is code ``j + i*cpw/2`` of word ``8T + 2c + t``.
The B operand ``Qexp`` (built once per program) holds ``q * 2**-e_j`` at the
accumulator column of (token p, head h, channel group g) and zero elsewhere.

Accumulator columns are ordered so that every sum a thread needs is local to
it: (p, h, g) sits in a column owned by thread ``c = h % 4`` (the wgmma layout
gives thread c the columns ``8*t8 + 2c + e``), slot ``k = u*ng + g`` of that
thread, u = p*NR/4 + h//4. The per-group scale multiply and the sum over
groups of a score are then done in registers.

Values (grouping ``t``, codes packed along T): one wgmma per (V chunk of 8 word
rows, pair j) with the *channels on M*: A = codes of 8 word rows (``TC`` tokens)
for 64 channels, B = ``Pexp`` (probabilities times 2**-e_j at the column of
(head, token group)), written to shared memory every block. M-row m of a
64-channel tile is channel ``16w + 2rr + rho`` (w warp, rr = lane // 4, row
``16w + rr + 8rho``) so that a thread's two rows are adjacent channels: their
words and scales are one 8-byte / 4-byte shared-memory load.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": exp2(NEG - m) == 0 and NEG - NEG is not NaN
MAGIC = 0x43004300  # two bf16 128.0: OR-ing a code into the mantissa gives 128 + code * 2**e
SWIZZLE = 32  # bytes: the B operands are [16, N] bf16 tiles of 16-column (32-byte) rows
# key_format="e4m3x2" (2-bit codes only): the key chain's A operands as e4m3, four codes per
# register. e4m3 0x50 is 8.0 with an empty mantissa, so OR-ing a code into mantissa bits 0-1
# gives 8 + code and into bits 1-2 gives 8 + 2 code. Byte b of a key word holds codes
# 4b .. 4b+3 (bits 0-1, 2-3, 4-5, 6-7); level i of E4M3_PLAN puts code 4b + i of every byte
# in place with one shift (shared by the levels 0/1 and 2/3 pairs) and one lop3.
E4M3_MAGIC = 0x50505050
E4M3_PLAN = ((0, 0x03030303), (1, 0x06060606), (4, 0x03030303), (5, 0x06060606))
E4M3_FAC = (1.0, 0.5, 1.0, 0.5)  # folded into Qexp: (8 + 2 code) * x/2 = 4x + code * x
E4M3_OFFSET = 8.0  # every A value is 8 + code * 2**(i % 2): Qexp's own sum times 8 cancels it
E4M3_TOP = 128.0  # each query head's largest |q * log2 e| is scaled into [TOP / 2, TOP)
KEY_FORMATS = ("bf16", "e4m3x2")


@functools.cache
def pair_plan(bits: int) -> tuple[tuple[int, int], ...]:
    """(shift, e) per code pair j: code j sits at bit ``bits*j`` of the word's low half and
    code j + cpw/2 at the same place of the high half; ``(word >> shift) & (mask << e)`` puts
    both at mantissa bit e of their half."""
    if bits == 2:  # 8 pairs; mantissa slots 0, 2, 4
        return tuple((6 * (j // 3), 2 * j - 6 * (j // 3)) for j in range(8))
    if bits == 4:  # 4 pairs; mantissa slots 0, 3
        return ((0, 0), (1, 3), (8, 0), (9, 3))
    raise ValueError(f"bits={bits}; the Mosaic GPU kernel supports 2 and 4")


def pair_mask(bits: int, j: int) -> int:
    _, e = pair_plan(bits)[j]
    return (((1 << bits) - 1) << e) * 0x10001


def unpack_pair_reference(words: np.ndarray, bits: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy meaning of one lop3: (low, high) bf16 values 128 + code * 2**e_j as float32."""
    sh, e = pair_plan(bits)[j]
    x = ((words.astype(np.int64) >> sh) & pair_mask(bits, j)) | MAGIC
    x = x.astype(np.uint32)
    lo = ((x & 0xFFFF) << 16).view(np.float32)
    hi = (x & 0xFFFF0000).view(np.float32)
    return lo, hi


def unpack_e4m3_reference(words: np.ndarray, i: int) -> np.ndarray:
    """numpy meaning of level i of the e4m3 unpack: [..., 4] values (byte b of each word)
    8 + code * 2**(i % 2), code 4b + i of the word."""
    import ml_dtypes
    sh, mask = E4M3_PLAN[i]
    x = (((words.astype(np.int64) >> sh) & mask) | E4M3_MAGIC).astype(np.uint32)
    b = x[..., None].view(np.uint8).reshape(*x.shape, 4)  # little endian: byte 0 first
    return b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e4m3_head_scale(top, xp):
    """The power of two per query head that puts its largest |q * log2 e| (``top``) in
    [E4M3_TOP / 2, E4M3_TOP); 1 where the head is all zero. ``xp``: numpy or jax.numpy (the
    XLA query operands and the query kernel both call it)."""
    e = xp.floor(xp.log2(xp.where(top > 0, top, 1.0)))
    return xp.where(top > 0, xp.exp2((math.log2(E4M3_TOP) - 1) - e), 1.0)


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Geometry:
    bits: int
    G: int
    D: int
    n_rep: int  # query heads per kv head
    BT: int  # tokens per pipeline block
    layout: str = "innerq"  # or "outerq": K grouped along T, V along D (see the module doc)
    key_format: str = "bf16"  # the key chain's operands: "bf16" or "e4m3x2" (E4M3_PLAN)

    @property
    def outer(self) -> bool:
        return self.layout == "outerq"

    # ------------------------------------------------------------ sizes
    @property
    def cpw(self) -> int:  # codes per uint32 word
        return 32 // self.bits

    @property
    def half(self) -> int:  # code pairs per word
        return self.cpw // 2

    @property
    def nw(self) -> int:  # K words per token
        return self.D // self.cpw

    @property
    def P(self) -> int:  # tokens per K row (the A operand needs 8 words = 16 columns per row)
        return max(1, 8 // self.nw)

    @property
    def KW(self) -> int:  # words per K row
        return self.P * self.nw

    @property
    def KT(self) -> int:  # 8-word tiles per K row: wgmma K steps per code pair
        return self.KW // 8

    @property
    def n_ksteps(self) -> int:
        return self.half * self.KT

    @property
    def e4m3(self) -> bool:
        return self.key_format == "e4m3x2"

    @property
    def n_ksteps8(self) -> int:  # e4m3 K steps (32 channels each): 4 levels per word tile
        return 4 * self.KT

    @property
    def k_steps(self) -> int:
        """The key chain's K steps in its key format (n_ksteps8 or n_ksteps)."""
        return self.n_ksteps8 if self.e4m3 else self.n_ksteps

    @property
    def kconst_rows(self) -> int:
        """koff, query sums; with e4m3 keys also 1 / the column's scale and a zero row (the
        copy into shared memory moves a multiple of 128 bytes)."""
        return 4 if self.e4m3 else 2

    @property
    def TM(self) -> int:  # tokens per 64-row K M-tile
        return 64 * self.P

    @property
    def MT(self) -> int:  # K M-tiles per block
        return self.BT // self.TM

    @property
    def ng(self) -> int:  # key groups per token
        return self.D // self.G

    @property
    def NR(self) -> int:  # query heads padded to a multiple of 4 (one per column owner)
        return _ceil_to(self.n_rep, 4)

    @property
    def OWN(self) -> int:  # heads per thread
        return self.NR // 4

    @property
    def ngv(self) -> int:  # token groups per block
        return self.BT // self.G

    @property
    def kg(self) -> int:  # key column groups per (token of the row, head)
        return self.ngv if self.outer else self.ng

    @property
    def NK(self) -> int:  # key accumulator columns
        return _ceil_to(self.P * self.NR * self.kg, 16)

    @property
    def TC(self) -> int:  # tokens per V chunk (8 word rows)
        return 8 * self.cpw

    @property
    def NC(self) -> int:  # V chunks per block
        return self.BT // self.TC

    @property
    def ngc(self) -> int:  # token groups per V chunk
        return self.TC // self.G

    @property
    def vg(self) -> int:  # value column groups per head
        return self.ng if self.outer else self.ngc

    @property
    def NV(self) -> int:  # value accumulator columns
        return _ceil_to(self.NR * self.vg, 16)

    @property
    def MV(self) -> int:  # 64-channel V M-tiles
        return self.D // 64

    # scratch of the cross-warp exchange (f32): block maxima, then (poff, psum) pairs
    @property
    def xchg_max_size(self) -> int:
        return 4 * self.OWN * 4

    @property
    def n_sums(self) -> int:  # per-thread column sums exchanged per block and V chunk
        return 2 * self.ng + 1 if self.outer else 2

    @property
    def xchg_size(self) -> int:
        chunks = self.NC if self.outer else self.MT
        return self.xchg_max_size + chunks * 4 * self.OWN * 4 * self.n_sums

    def validate(self) -> None:
        if self.layout not in ("innerq", "outerq"):
            raise ValueError(f"layout={self.layout!r}; choose 'innerq' or 'outerq'")
        if self.bits not in (2, 4):
            raise ValueError(f"bits={self.bits}; the Mosaic GPU kernel supports 2 and 4")
        if self.D % 64 or not 64 <= self.D <= 256:
            raise ValueError(
                f"head_dim={self.D} must be 64, 128, 192 or 256 (64-channel wgmma tiles)")
        if self.D % self.G or self.G % 32 or self.G > self.TC:
            raise ValueError(
                f"group_size={self.G} must divide head_dim={self.D}, be a multiple of 32 and at "
                f"most {self.TC} (tokens of one V chunk at {self.bits} bits)")
        if self.nw & (self.nw - 1) or self.KW % 8:
            raise ValueError(
                f"head_dim={self.D} gives {self.nw} key words per token; need 4, 8 or 16")
        step = math.lcm(self.TM, self.TC)
        if self.BT % step or self.BT > 256:
            raise ValueError(
                f"block_tokens={self.BT} must be a multiple of {step} (K tile {self.TM} tokens, "
                f"V chunk {self.TC} tokens) and at most 256 (TMA box)")
        if self.NK > 256 or self.NV > 256:
            raise ValueError(f"n_rep={self.n_rep} gives {self.NK}/{self.NV} MMA columns (max 256)")
        if self.key_format not in KEY_FORMATS:
            raise ValueError(f"key_format={self.key_format!r}; choose one of {KEY_FORMATS}")
        if self.e4m3 and (self.outer or self.bits != 2):
            raise ValueError(
                f"key_format='e4m3x2' takes 2-bit InnerQ keys (three mantissa bits hold a 2-bit "
                f"code); got layout={self.layout!r}, bits={self.bits}")
        if self.outer and self.P != 1:
            raise ValueError(
                f"the OuterQ kernel needs one token per K row (at least 8 key words per token); "
                f"head_dim={self.D} at {self.bits} bits gives {self.nw}")

    # ------------------------------------------------------ column maps
    @staticmethod
    def col_of_slot(k, c):
        """Accumulator column of slot k of thread c (wgmma layout: columns 8*t8 + 2c + e)."""
        return 8 * (k // 2) + 2 * c + k % 2

    def k_slot(self, p: int, h: int, g: int) -> tuple[int, int]:
        """(owner thread c, slot) of key column (token p of the row, head h, group g)."""
        return h % 4, (p * self.OWN + h // 4) * self.kg + g

    def k_col(self, p: int, h: int, g: int) -> int:
        c, k = self.k_slot(p, h, g)
        return self.col_of_slot(k, c)

    def v_col(self, uh, gt, c):
        """Value column of (head 4*uh + c, token group gt of the chunk; OuterQ: channel
        group gt)."""
        return self.col_of_slot(uh * self.vg + gt, c)

    @staticmethod
    def v_channel(m):
        """Channel held by V M-row m (the thread's two rows are adjacent channels)."""
        t, r = m // 64, m % 64
        return 64 * t + 16 * (r // 16) + 2 * (r % 8) + (r % 16) // 8

    def v_row(self, d):
        """V M-row of channel d (inverse of :meth:`v_channel`)."""
        t, r = d // 64, d % 64
        return 64 * t + 16 * (r // 16) + (r % 16) // 2 + 8 * (r % 2)

    def v_col_head(self, col: int):
        """The head whose token group 0 sits in value column col, or None."""
        c, k = (col % 8) // 2, 2 * (col // 8) + col % 2
        uh, gt = k // self.vg, k % self.vg
        h = 4 * uh + c
        return h if gt == 0 and uh < self.OWN and h < self.n_rep else None

    def pexp_row(self, tau_c):
        """(pair j, A column a) that meets token tau_c of a V chunk."""
        wr, kk = tau_c // self.cpw, tau_c % self.cpw
        i, j = kk // self.half, kk % self.half
        return j, 8 * (wr % 2) + 2 * (wr // 2) + i

    def pexp_offset(self, ck, j, a, col):
        """bf16 element offset of Pexp[ck, j][a, col] in the tiled (8, 16), 32-byte-swizzled
        shared buffer [NC*half, 16, NV] (Mosaic's swizzle: 16-byte chunk ^= (byte // 128) % 2)."""
        return self.b_offset(ck * self.half + j, a, col, self.NV)

    @staticmethod
    def b_offset(tile, a, col, ncols: int):
        """bf16 element offset of B[tile][a, col] in a tiled (8, 16), 32-byte-swizzled shared
        buffer [tiles, 16, ncols] (a B operand: Pexp, or the OuterQ kernel's Qexp)."""
        nt = ncols // 16
        elem = (((tile * 2 + a // 8) * nt + col // 16) * 8 + a % 8) * 16 + col % 16
        byte = elem * 2
        byte = byte ^ (((byte // 128) % (SWIZZLE // 16)) * 16)
        return byte // 2

    def group_slices(self, ck: int, gt: int) -> list[tuple[int, int]]:
        """(K M-tile, warp) pairs whose tokens form token group gt of V chunk ck."""
        t0 = ck * self.TC + gt * self.G
        span = 16 * self.P  # tokens of one warp in one K M-tile
        return [(t // self.TM, (t % self.TM) // span) for t in range(t0, t0 + self.G, span)]

    # ------------------------------------------------------ XLA-side tables
    @functools.cached_property
    def qexp_tables(self):
        """For Qexp [n_ksteps, 16, NK]: head, channel and factor (2**-e_j, 0 = structural zero)."""
        plan = pair_plan(self.bits)
        head = np.zeros((self.n_ksteps, 16, self.NK), np.int32)
        chan = np.zeros_like(head)
        fac = np.zeros(head.shape, np.float32)
        for j in range(self.half):
            for T in range(self.KT):
                s = j * self.KT + T
                for a in range(16):
                    t, c, i = a // 8, (a % 8) // 2, a % 2
                    wi = 8 * T + 2 * c + t
                    p, wt = wi // self.nw, wi % self.nw
                    ch = wt * self.cpw + j + i * self.half
                    for h in range(self.n_rep):
                        col = self.k_col(p, h, ch // self.G)
                        head[s, a, col], chan[s, a, col] = h, ch
                        fac[s, a, col] = 2.0 ** -plan[j][1]
        return head, chan, fac

    @functools.cached_property
    def qexp8_tables(self):
        """For the e4m3 Qexp [n_ksteps8, NK, 32] (K-major: a row per accumulator column):
        head, channel and factor (E4M3_FAC, 0 = structural zero). Column a = 16t + 4c + b of
        step 4T + i is code 4b + i of word 8T + 2c + t of the K row (the 8-bit wgmma register
        layout: thread c holds columns 4c .. 4c+3 of each 16-column half t)."""
        shape = (self.n_ksteps8, self.NK, 32)
        head, chan = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        fac = np.zeros(shape, np.float32)
        for T in range(self.KT):
            for i in range(4):
                s = 4 * T + i
                for a in range(32):
                    t, c, b = a // 16, (a % 16) // 4, a % 4
                    wi = 8 * T + 2 * c + t
                    p, wt = wi // self.nw, wi % self.nw
                    ch = wt * self.cpw + 4 * b + i
                    for h in range(self.n_rep):
                        col = self.k_col(p, h, ch // self.G)
                        head[s, col, a], chan[s, col, a] = h, ch
                        fac[s, col, a] = E4M3_FAC[i]
        return head, chan, fac

    @functools.cached_property
    def qsum_tables(self):
        """For qsum [NK]: (head, group, valid) of each key column."""
        head = np.zeros(self.NK, np.int32)
        grp = np.zeros(self.NK, np.int32)
        ok = np.zeros(self.NK, bool)
        for p in range(self.P):
            for h in range(self.n_rep):
                for g in range(self.ng):
                    col = self.k_col(p, h, g)
                    head[col], grp[col], ok[col] = h, g, True
        return head, grp, ok

    @functools.cached_property
    def combine_tables(self):
        """Value columns of each (head, token group) [n_rep, ngc]; the row of each channel [D]."""
        cols = np.array([[self.v_col(h // 4, gt, h % 4) for gt in range(self.vg)]
                         for h in range(self.n_rep)], np.int32)
        rows = np.zeros(self.D, np.int32)
        for m in range(self.D):
            rows[self.v_channel(m)] = m
        return cols, rows


def default_block_tokens(bits: int, G: int, D: int) -> int:
    geo = Geometry(bits, G, D, 1, 64)
    return max(128, math.lcm(geo.TM, geo.TC))


__all__ = ["E4M3_FAC", "E4M3_MAGIC", "E4M3_OFFSET", "E4M3_TOP", "E4M3_PLAN", "Geometry",
           "KEY_FORMATS", "LOG2E", "MAGIC", "NEG", "default_block_tokens", "pair_mask",
           "pair_plan", "e4m3_head_scale", "unpack_e4m3_reference", "unpack_pair_reference"]

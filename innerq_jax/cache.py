"""The functional KV cache: immutable pytrees updated by pure functions.

Three layer kinds share one interface (``create`` / ``prefill`` / ``append``):

* :class:`QuantLayer` - InnerQ and OuterQ: bf16 sink window, group-quantized
  middle (packed codes, scales, zero-points, hybrid mask) and a bf16 recent
  ring; plus the key normalization (centre, scale) computed at prefill.
* :class:`DenseLayer` - the bf16 baseline.
* :class:`Int8Layer` - int8 codes with one scale per (token, head).

:class:`KVCache` holds one layer pytree per model layer (a tuple, so a model
loops over layers and each layer's buffers are updated where they are; a
``lax.scan`` that took the cache in and returned it would copy every layer on
every step) and per-sequence lengths. Every update returns a new cache; under
``jax.jit(..., donate_argnums=...)`` XLA updates the buffers in place, and a
decode step writes only the new token's rows (plus one group's codes, scales
and mask where a sequence flushes). Lengths never exceed the capacity: an
append to a full sequence writes nothing, keeps its length and sets its
``overflow`` flag, and every other sequence goes on (host code checks capacity
before it starts; see :func:`check_capacity`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax.config import CacheConfig, is_int
from innerq_jax.layout import (
    ARRAY_FIELDS,
    QuantizedTensor,
    empty_quantized,
    quantize_tokens,
    quantized_count,
    recent_slot_tokens,
    region_sizes,
    rows_per_token,
)

COMPUTE_DTYPE = jnp.bfloat16


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@functools.cache
def hadamard(D: int) -> np.ndarray:
    """Orthonormal, symmetric Sylvester-Hadamard matrix [D, D] (D a power of two)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < D:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(D)


def rotation_signs(cfg: CacheConfig, layer: int, batch: int, num_kv_heads: int,
                   head_dim: int) -> jax.Array | None:
    """The randomized Hadamard's signs: [B, Hkv, D] int8 of +-1, or None when unused.

    A pure function of (cfg.rotation_seed, layer, kv head): the same signs for
    every sequence (the batch axis only lets the leaf shard like every other
    one, batch on ``data`` and kv heads on ``model``), different across layers and
    heads. Build it for the global heads and let the mesh split it: a function of
    the local head index inside ``shard_map`` would repeat heads across devices.
    """
    if not (cfg.quantized and cfg.rotation_signs):
        return None
    rows = [np.random.default_rng([cfg.rotation_seed, int(layer), h]).integers(0, 2, head_dim)
            for h in range(num_kv_heads)]
    s = (2 * np.stack(rows) - 1).astype(np.int8)  # [H, D]
    return jnp.asarray(np.broadcast_to(s, (batch, num_kv_heads, head_dim)))


def _apply_signs(x: jax.Array, signs) -> jax.Array:
    """x [B, H, T, D] times signs [B, H, D] (None: x)."""
    return x if signs is None else x * signs.astype(x.dtype)[:, :, None, :]


def _scatter_rows(arr: jax.Array, start: jax.Array, new: jax.Array, enabled: jax.Array):
    """arr[b, :, start[b] + i] = new[b, :, i] where enabled[b]; others untouched.

    arr [B, H, N, ...], start [B], new [B, H, n, ...], enabled [B]. Disabled rows
    get an out-of-range index and are dropped, so nothing is ever written
    out of bounds.
    """
    B, n, N = arr.shape[0], new.shape[2], arr.shape[2]
    rows = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, n]
    rows = jnp.where(enabled[:, None], rows, N)
    b = jnp.arange(B, dtype=jnp.int32)[:, None]
    return arr.at[b, :, rows].set(jnp.moveaxis(new, 2, 1).astype(arr.dtype), mode="drop")


def _check_kv(k, v, name: str, ndim: int):
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v shapes differ: {k.shape} vs {v.shape}")
    if k.ndim != ndim:
        raise ValueError(f"{name}: expected k/v with {ndim} dims, got shape {k.shape}")
    for x, n in ((k, "k"), (v, "v")):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {n} must be floating point, got {x.dtype}")


# ====================================================================== InnerQ
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantLayer:
    """One layer of an InnerQ / OuterQ cache (shapes without the layer axis)."""

    k: QuantizedTensor  # grouping cfg.k_grouping, packed along D; Tq = cfg.quant_capacity
    v: QuantizedTensor  # grouping cfg.v_grouping, packed along T
    sink_k: jax.Array  # [B, H, S, D] bf16, normalized (and rotated) keys
    sink_v: jax.Array  # [B, H, S, D] bf16
    recent_k: jax.Array  # [B, H, R + G, D] bf16 ring, rest token j in slot j % (R + G)
    recent_v: jax.Array  # [B, H, R + G, D] bf16
    k_centre: jax.Array  # [B, H, D] f32, mu (zero unless key_norm == centre_scale)
    k_scale: jax.Array  # [B, H, D] f32, sigma (one unless key_norm != none)
    # [B, H, D] int8 +-1: randomized Hadamard signs (cfg.rotation_signs), else None
    rot_signs: jax.Array | None = None

    # ------------------------------------------------------------ transforms
    @staticmethod
    def key_transform(k: jax.Array, centre, scale, cfg: CacheConfig, signs=None) -> jax.Array:
        """(k - mu) [signed, rotated] / sigma; k [B, H, T, D], centre/scale [B, H, D].

        The rotation is x -> (x * s) @ H: H diag(s) applied to each token's key."""
        x = k.astype(jnp.float32) - centre[:, :, None, :]
        if cfg.rotate_keys:
            x = _apply_signs(x, signs) @ hadamard(k.shape[-1])
        return x / scale[:, :, None, :]

    @staticmethod
    def value_transform(v: jax.Array, cfg: CacheConfig, signs=None) -> jax.Array:
        x = v.astype(jnp.float32)
        return _apply_signs(x, signs) @ hadamard(v.shape[-1]) if cfg.rotate_values else x

    @staticmethod
    def key_statistics(k: jax.Array, lengths: jax.Array, cfg: CacheConfig, signs=None):
        """Per (sequence, head, channel) centre and scale over prompt tokens past the sinks.

        Tokens outside that range are masked with ``where``, never multiplied by a zero
        weight: NaN * 0 is NaN, so padding or a NaN sink token would poison the statistics.
        """
        B, H, T, D = k.shape
        t = jnp.arange(T)[None, :]
        use = ((t >= cfg.sink) & (t < lengths[:, None]))[:, None, :, None]  # [B, 1, T, 1]
        n = jnp.sum(use, axis=2, dtype=jnp.float32)  # [B, 1, 1]
        has = n > 0
        x = k.astype(jnp.float32)
        if cfg.key_norm == "centre_scale":
            total = jnp.sum(jnp.where(use, x, 0.0), axis=2)
            centre = jnp.where(has, total / jnp.maximum(n, 1), 0.0)
        else:
            centre = jnp.zeros((B, H, D), jnp.float32)
        centre = jnp.broadcast_to(centre, (B, H, D))
        if cfg.key_norm == "none":
            return centre, jnp.ones((B, H, D), jnp.float32)
        y = x - centre[:, :, None, :]
        if cfg.rotate_keys:
            y = _apply_signs(y, signs) @ hadamard(D)
        if cfg.key_scale == "absmax":
            stat = jnp.max(jnp.where(use, jnp.abs(y), 0.0), axis=2)
            # as in quant.py: a non-finite prompt key stays visible (the CPU max may drop NaN)
            finite = jnp.all(jnp.where(use, jnp.isfinite(y), True), axis=2)
            stat = jnp.where(finite, stat, jnp.nan)
        else:  # std about the centre (root mean square when uncentred)
            stat = jnp.sqrt(jnp.sum(jnp.where(use, jnp.square(y), 0.0), axis=2) / jnp.maximum(n, 1))
        scale = jnp.where(has, jnp.maximum(stat, cfg.norm_eps), 1.0)
        return centre, scale

    # ----------------------------------------------------------- construction
    @classmethod
    def create(cls, B: int, H: int, D: int, cfg: CacheConfig, layer: int = 0) -> "QuantLayer":
        S, W, Tq = cfg.sink, cfg.window, cfg.quant_capacity
        zeros = lambda n: jnp.zeros((B, H, n, D), COMPUTE_DTYPE)  # noqa: E731
        return cls(
            k=empty_quantized((B, H), Tq, D, cfg.k_grouping, cfg, packing="d", which="k"),
            v=empty_quantized((B, H), Tq, D, cfg.v_grouping, cfg, packing="t", which="v"),
            sink_k=zeros(S),
            sink_v=zeros(S),
            recent_k=zeros(W),
            recent_v=zeros(W),
            k_centre=jnp.zeros((B, H, D), jnp.float32),
            k_scale=jnp.ones((B, H, D), jnp.float32),
            rot_signs=rotation_signs(cfg, layer, B, H, D),
        )

    @classmethod
    def prefill(cls, k: jax.Array, v: jax.Array, lengths: jax.Array, cfg: CacheConfig,
                layer: int = 0, signs: jax.Array | None = None):
        """Builds the layer from a prompt's k, v [B, H, T, D] (ragged: lengths [B]).

        With ``cfg.rotation_signs`` the signs are ``signs`` when given (a model
        under a mesh passes each device its heads' share), else those of
        ``layer`` (:func:`rotation_signs`)."""
        B, H, T, D = k.shape
        S, G, Tq = cfg.sink, cfg.group_size, cfg.quant_capacity
        if cfg.rotation_signs:
            signs = rotation_signs(cfg, layer, B, H, D) if signs is None else signs
            if signs.shape != (B, H, D):
                raise ValueError(f"signs shape {signs.shape} != [B, H, D] {(B, H, D)}")
            signs = signs.astype(jnp.int8)
        else:
            signs = None
        centre, scale = cls.key_statistics(k, lengths, cfg, signs)
        kt = cls.key_transform(k, centre, scale, cfg, signs)  # [B, H, T, D] f32
        vt = cls.value_transform(v, cfg, signs)

        def region(x, start, n):  # tokens start .. start + n of x, zero-padded past T
            pad = max(0, start + n - T)
            x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
            return jax.lax.slice_in_dim(x, start, start + n, axis=2)

        sizes = region_sizes(lengths, cfg)
        sink_ok = (jnp.arange(S) < sizes.sink[:, None])[:, None, :, None]
        sink_k = jnp.where(sink_ok, region(kt, 0, S), 0).astype(COMPUTE_DTYPE)
        sink_v = jnp.where(sink_ok, region(vt, 0, S), 0).astype(COMPUTE_DTYPE)

        # Quantized region: every whole group of the prompt, then the groups a
        # sequence has not reached are cleared, so no group spans two sequences
        # and nothing past a sequence's length is ever stored.
        nq = sizes.quantized  # [B]
        Tfill = min(Tq, max(0, (T - S) // G * G))
        k_q = empty_quantized((B, H), Tq, D, cfg.k_grouping, cfg, packing="d", which="k")
        v_q = empty_quantized((B, H), Tq, D, cfg.v_grouping, cfg, packing="t", which="v")
        if Tfill:
            kq_new = quantize_tokens(region(kt, S, Tfill), cfg.k_grouping, cfg, packing="d",
                                     which="k")
            vq_new = quantize_tokens(region(vt, S, Tfill), cfg.v_grouping, cfg, packing="t",
                                     which="v")
            k_q = _place_groups(k_q, kq_new, nq)
            v_q = _place_groups(v_q, vq_new, nq)

        # Recent ring: slot s holds rest token j(s) when live.
        j, live = recent_slot_tokens(lengths, cfg)  # [B, W]
        src = jnp.clip(S + j, 0, T - 1)
        gather = lambda x: jnp.take_along_axis(x, src[:, None, :, None], axis=2)  # noqa: E731
        live4 = live[:, None, :, None]
        recent_k = jnp.where(live4, gather(kt), 0).astype(COMPUTE_DTYPE)
        recent_v = jnp.where(live4, gather(vt), 0).astype(COMPUTE_DTYPE)
        return cls(k_q, v_q, sink_k, sink_v, recent_k, recent_v, centre, scale, signs)

    # ----------------------------------------------------------------- decode
    def append(self, k: jax.Array, v: jax.Array, lengths: jax.Array, cfg: CacheConfig,
               writer: str = "auto"):
        """Adds one token per sequence (k, v [B, H, D], raw); lengths are before it.
        :meth:`append_with_counters` also returns the fused attention op's done-counters.

        ``writer`` moves the rows: ``"scatter"`` (XLA scatters, one per array),
        ``"pallas"`` (one kernel per layer, :mod:`pallas_kernels.cache_update`),
        ``"interpret"`` (that kernel in Pallas interpret mode), ``"pallas-rows"`` (the
        kernel, with the flush groups quantized by XLA as before it took them) or
        ``"auto"`` (the environment variable ``INNERQ_CACHE_WRITER`` if set, else the
        kernel on a GPU and scatters elsewhere). Where the kernel can (bf16 scales, power-of-two
        blocks) it also quantizes the flush groups, in the same launch. All give the
        same rows; the quantized groups are the same bit for bit in Pallas interpret
        mode, and compiled on a GPU up to the hybrid choice between two modes whose
        errors are equal to rounding (:mod:`pallas_kernels.cache_update`).
        """
        return self._append(k, v, lengths, cfg, writer, counters=False)[0]

    def append_with_counters(self, k: jax.Array, v: jax.Array, lengths: jax.Array,
                             cfg: CacheConfig, writer: str = "auto"):
        """:meth:`append`, and the fused Triton attention op's done-counters for this layer:
        (the new layer, [H, B] int32 zeros written by the append's own kernel, or None where
        the append ran without it). Handed to the attention op (``decode_attention_layer(...,
        counters=...)``), they spare it a memset launch per call (~1 us per layer on the
        H200, benchmarks/KERNEL_NOTES.md, round 22); the array is the op's scratch, used
        once."""
        return self._append(k, v, lengths, cfg, writer, counters=True)

    def _append(self, k, v, lengths, cfg: CacheConfig, writer: str, counters: bool):
        """(the new layer, the counters or None); see :meth:`append_with_counters`."""
        S, W, G = cfg.sink, cfg.window, cfg.group_size
        full = lengths >= cfg.capacity
        kt = self.key_transform(k[:, :, None, :], self.k_centre, self.k_scale, cfg,
                                self.rot_signs)
        vt = self.value_transform(v[:, :, None, :], cfg, self.rot_signs)  # [B, H, 1, D]
        kt, vt = kt.astype(COMPUTE_DTYPE), vt.astype(COMPUTE_DTYPE)

        to_sink = (lengths < S) & ~full
        to_ring = (lengths >= S) & ~full
        rest_old = jnp.maximum(lengths - S, 0)
        slot = jnp.mod(rest_old, W)

        # Flush: the window reached R + G tokens, so its oldest G leave it.
        nq_old = quantized_count(rest_old, cfg)
        nq_new = quantized_count(rest_old + to_ring.astype(jnp.int32), cfg)
        flush = nq_new > nq_old
        start_slot = jnp.mod(nq_old, W)  # a multiple of G: groups never wrap
        # The group is its slots as they were before this token, with the token in its
        # row where it is one of them (recent = 0; -1: none): every write below then
        # reads only the old arrays, so all of them can go in one kernel.
        own_row = jnp.where(to_ring & (slot >= start_slot) & (slot < start_slot + G),
                            slot - start_slot, -1)
        # The oldest G ring tokens [B, H, G, D] are quantized on every step (a few
        # thousand values per layer, far less than the cache read) and written
        # only into the sequences that flush; a lax.cond here would sync the
        # host on a GPU, and one that returned the whole quantized tensors
        # would copy them.
        sink_row = jnp.minimum(lengths, S)
        writes = [(self.sink_k, kt, sink_row, to_sink), (self.sink_v, vt, sink_row, to_sink),
                  (self.recent_k, kt, slot, to_ring), (self.recent_v, vt, slot, to_ring)]
        writer = resolve_writer(writer)
        if writer in ("pallas", "interpret") and _kernel_quantizes(self, cfg, writes):
            # one launch: the writes, and both groups quantized inside the kernel
            from pallas_kernels import cache_update
            live = [i for i, w in enumerate(writes) if w[0].shape[2]]
            ring = {i: n for n, i in enumerate(live)}
            groups = [cache_update.GroupWrite(ring[r], start_slot, own_row, qt, nq_old, flush,
                                              cfg, which)
                      for r, qt, which in ((2, self.k, "k"), (3, self.v, "v"))]
            out = cache_update.write_rows([writes[i] for i in live], groups,
                                          interpret=writer == "interpret", counters=counters)
            done = dict(zip(live, out))
            sink_k, sink_v, recent_k, recent_v = (done.get(i, w[0]) for i, w in enumerate(writes))
            new_k, new_v, *zeroed = out[len(live):]
        else:
            take = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, G, axis=1))
            own = (jnp.arange(G) == own_row[:, None])[:, None, :, None]  # [B, 1, G, 1]

            def group(ring, new):
                return jnp.where(own, new, take(ring, start_slot))

            grp_k = quantize_tokens(group(self.recent_k, kt).astype(jnp.float32),
                                    cfg.k_grouping, cfg, packing="d", which="k")
            grp_v = quantize_tokens(group(self.recent_v, vt).astype(jnp.float32),
                                    cfg.v_grouping, cfg, packing="t", which="v")
            for qt, grp in ((self.k, grp_k), (self.v, grp_v)):
                for f in ARRAY_FIELDS:
                    num, den = rows_per_token(qt, f)
                    writes.append((getattr(qt, f), getattr(grp, f), nq_old * num // den, flush))
            out = iter(write_rows(writes, writer))
            sink_k, sink_v, recent_k, recent_v = (next(out) for _ in range(4))
            new_k, new_v = (dataclasses.replace(qt, **{f: next(out) for f in ARRAY_FIELDS})
                            for qt in (self.k, self.v))
            zeroed = []
        layer = dataclasses.replace(self, k=new_k, v=new_v, sink_k=sink_k, sink_v=sink_v,
                                    recent_k=recent_k, recent_v=recent_v)
        return layer, (zeroed[0] if zeroed else None)


def _kernel_quantizes(layer: "QuantLayer", cfg: CacheConfig, writes) -> bool:
    """Whether the write kernel takes the whole append: every write and both groups."""
    from pallas_kernels import cache_update
    return (all(cache_update.kernel_can_write(dst, src) for dst, src, _, _ in writes
                if dst.shape[2])
            and cache_update.kernel_can_quantize(layer.recent_k, layer.k, cfg, "k")
            and cache_update.kernel_can_quantize(layer.recent_v, layer.v, cfg, "v"))


WRITERS = ("auto", "scatter", "pallas", "interpret", "pallas-rows")


def resolve_writer(writer: str) -> str:
    """``"auto"`` made concrete (see :meth:`QuantLayer.append`); others checked."""
    if writer == "auto":
        # INNERQ_CACHE_WRITER overrides the choice (read when a step is traced: after
        # changing it, jax.clear_caches() so jitted steps trace again)
        env = os.environ.get("INNERQ_CACHE_WRITER", "auto") or "auto"
        if env not in WRITERS:
            raise ValueError(f"INNERQ_CACHE_WRITER={env!r}; choose one of {WRITERS}")
        return env if env != "auto" else (
            "pallas" if jax.default_backend() == "gpu" else "scatter")
    if writer not in WRITERS:
        raise ValueError(f"writer={writer!r}; choose one of {WRITERS}")
    return writer


def write_rows(writes, writer: str = "auto") -> list[jax.Array]:
    """``dst[b, :, start[b]:start[b] + n] = src[b]`` where ``enabled[b]``, for every
    ``(dst [B, H, N, ...], src [B, H, n, ...], start [B], enabled [B])`` of ``writes``;
    the new destinations in order. See :meth:`QuantLayer.append` for ``writer``.
    Writes the kernel cannot take (blocks that are not powers of two) use scatters.
    """
    writer = resolve_writer(writer)
    out: list = [None] * len(writes)
    fused = []
    if writer != "scatter":
        from pallas_kernels import cache_update
    for i, (dst, src, start, enabled) in enumerate(writes):
        if dst.shape[2] == 0:  # no sink: nothing to write
            out[i] = dst
        elif writer != "scatter" and cache_update.kernel_can_write(dst, src):
            fused.append(i)
        else:
            out[i] = _scatter_rows(dst, start, src, enabled)
    if fused:
        done = cache_update.write_rows([writes[i] for i in fused],
                                       interpret=writer == "interpret")
        for i, arr in zip(fused, done):
            out[i] = arr
    return out


def _place_groups(dst: QuantizedTensor, src: QuantizedTensor, nq: jax.Array):
    """Copies src's first groups into dst, keeping only rows of tokens below nq [B]."""
    out = {}
    for f in ARRAY_FIELDS:
        a, b = getattr(dst, f), getattr(src, f)
        num, den = rows_per_token(dst, f)
        rows = jnp.arange(b.shape[2])
        keep = (rows * den // num)[None, :] < nq[:, None]  # [B, rows]: a row's first token
        keep = keep.reshape(keep.shape[0], 1, -1, *([1] * (b.ndim - 3)))
        out[f] = jax.lax.dynamic_update_slice_in_dim(a, jnp.where(keep, b, 0).astype(a.dtype), 0, 2)
    return dataclasses.replace(dst, **out)


# ======================================================================= dense
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """The bf16 baseline: every token in full precision."""

    k: jax.Array  # [B, H, C, D] bf16
    v: jax.Array  # [B, H, C, D] bf16

    @classmethod
    def create(cls, B, H, D, cfg, layer: int = 0):
        # two distinct buffers: a donated cache may not hold one array twice
        z = lambda: jnp.zeros((B, H, cfg.capacity, D), COMPUTE_DTYPE)  # noqa: E731
        return cls(z(), z())

    @classmethod
    def prefill(cls, k, v, lengths, cfg, layer: int = 0, signs=None):
        B, H, T, D = k.shape
        ok = (jnp.arange(T)[None, :] < lengths[:, None])[:, None, :, None]
        pad = ((0, 0), (0, 0), (0, cfg.capacity - T), (0, 0))
        put = lambda x: jnp.pad(jnp.where(ok, x, 0), pad).astype(COMPUTE_DTYPE)  # noqa: E731
        return cls(put(k), put(v))

    def append_with_counters(self, k, v, lengths, cfg):
        """(:meth:`append`, None): no kernel of this layer writes attention counters."""
        return self.append(k, v, lengths, cfg), None

    def append(self, k, v, lengths, cfg):
        ok = lengths < cfg.capacity
        return DenseLayer(
            _scatter_rows(self.k, lengths, k[:, :, None, :], ok),
            _scatter_rows(self.v, lengths, v[:, :, None, :], ok),
        )


# ======================================================================== int8
def _int8_quantize(x):
    """Symmetric per-(token, head) int8: x [B, H, T, D] -> codes int8, scale [B, H, T]."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # A NaN scale keeps a non-finite row non-finite (XLA's CPU max can drop a NaN).
    amax = jnp.where(jnp.all(jnp.isfinite(x), axis=-1), amax, jnp.nan)
    scale = (amax / 127.0).astype(COMPUTE_DTYPE)
    inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1).astype(jnp.float32), 0.0)
    codes = jnp.clip(jnp.round(x * inv[..., None]), -127, 127)
    return jnp.where(jnp.isfinite(codes), codes, 0).astype(jnp.int8), scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Layer:
    k: jax.Array  # [B, H, C, D] int8
    v: jax.Array  # [B, H, C, D] int8
    k_scale: jax.Array  # [B, H, C] bf16
    v_scale: jax.Array  # [B, H, C] bf16

    @classmethod
    def create(cls, B, H, D, cfg, layer: int = 0):
        c = lambda: jnp.zeros((B, H, cfg.capacity, D), jnp.int8)  # noqa: E731
        s = lambda: jnp.zeros((B, H, cfg.capacity), COMPUTE_DTYPE)  # noqa: E731
        return cls(c(), c(), s(), s())

    @classmethod
    def prefill(cls, k, v, lengths, cfg, layer: int = 0, signs=None):
        dense = DenseLayer.prefill(k, v, lengths, cfg)
        (kc, ks), (vc, vs) = _int8_quantize(dense.k), _int8_quantize(dense.v)
        return cls(kc, vc, ks, vs)

    def append_with_counters(self, k, v, lengths, cfg):
        """(:meth:`append`, None): no kernel of this layer writes attention counters."""
        return self.append(k, v, lengths, cfg), None

    def append(self, k, v, lengths, cfg):
        ok = lengths < cfg.capacity
        (kc, ks), (vc, vs) = _int8_quantize(k[:, :, None]), _int8_quantize(v[:, :, None])
        return Int8Layer(
            _scatter_rows(self.k, lengths, kc, ok),
            _scatter_rows(self.v, lengths, vc, ok),
            _scatter_rows(self.k_scale, lengths, ks, ok),
            _scatter_rows(self.v_scale, lengths, vs, ok),
        )


LayerCache = Union[QuantLayer, DenseLayer, Int8Layer]
_LAYER_KIND = {"innerq": QuantLayer, "outerq": QuantLayer, "bf16": DenseLayer, "int8": Int8Layer}


def layer_class(cfg: CacheConfig):
    """The layer class of a cache kind. Every class takes ``create(B, H, D, cfg, layer=0)``
    and ``prefill(k, v, lengths, cfg, layer=0, signs=None)``, and its layers
    ``append(k, v, lengths, cfg)`` and ``append_with_counters(...)`` (the new layer and the
    fused attention op's done-counters its append kernel wrote, or None); the layer index
    and the randomized Hadamard signs only matter to a rotated quantized layer."""
    return _LAYER_KIND[cfg.kind]


# ==================================================================== the cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers of a model's cache: one layer pytree per model layer."""

    layers: tuple  # (LayerCache,) * L, leaves [B, Hkv, ...]
    lengths: jax.Array  # [B] int32 tokens held per sequence
    overflow: jax.Array  # [B] bool: an append found the sequence full, or a traced
    #                      prefill length outside [0, T] was clamped
    config: CacheConfig = _static()
    num_kv_heads: int = _static()
    head_dim: int = _static()

    # ------------------------------------------------------------ construction
    @classmethod
    def create(cls, config: CacheConfig, num_layers: int, batch: int, num_kv_heads: int,
               head_dim: int) -> "KVCache":
        """An empty cache of static capacity ``config.capacity`` tokens per sequence."""
        num_layers, batch, num_kv_heads, head_dim = _check_sizes(
            config, num_layers, batch, num_kv_heads, head_dim)
        layers = tuple(layer_class(config).create(batch, num_kv_heads, head_dim, config, layer=i)
                       for i in range(num_layers))
        return cls(layers, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), config,
                   num_kv_heads, head_dim)

    @classmethod
    def from_prefill(cls, config: CacheConfig, k: jax.Array, v: jax.Array,
                     lengths: jax.Array) -> "KVCache":
        """Builds a cache from a prompt's k, v [L, B, Hkv, T, D]; lengths [B] (ragged)."""
        _check_kv(k, v, "KVCache.from_prefill", 5)
        L, B, H, T, D = k.shape
        _check_sizes(config, L, B, H, D)
        lengths, clamped = _check_lengths(lengths, B, T, config)
        layers = tuple(_prefill_layer(k[i], v[i], lengths, config,
                                      rotation_signs(config, i, B, H, D)) for i in range(L))
        return dataclasses.replace(cls.from_layers(config, layers, lengths), overflow=clamped)

    @classmethod
    def from_layers(cls, config: CacheConfig, layers, lengths: jax.Array) -> "KVCache":
        """A cache from per-layer caches already built (e.g. by a model's prefill)."""
        layers = tuple(layers)
        if not layers:
            raise ValueError("a cache needs at least one layer")
        want = layer_class(config)
        if not all(isinstance(lay, want) for lay in layers):
            raise TypeError(f"layers must all be {want.__name__} for kind={config.kind!r}")
        B, H = layers[0].k_centre.shape[:2] if want is QuantLayer else layers[0].k.shape[:2]
        D = layers[0].k_centre.shape[2] if want is QuantLayer else layers[0].k.shape[3]
        # a copy: the cache owns its lengths (donating it must not delete the caller's array)
        lengths = jnp.array(lengths, jnp.int32)
        return cls(layers, lengths, jnp.zeros((B,), bool), config, H, D)

    # ------------------------------------------------------------------ decode
    def append(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """Appends one token per sequence to every layer: k, v [L, B, Hkv, D]."""
        _check_kv(k, v, "KVCache.append", 4)
        expect = (self.num_layers, self.batch, self.num_kv_heads, self.head_dim)
        if k.shape != expect:
            raise ValueError(f"KVCache.append: k/v shape {k.shape} != [L, B, Hkv, D] {expect}")
        return self.with_layers(_append_layers(self.layers, k, v, self.lengths, self.config))

    def append_layer(self, i: int, k: jax.Array, v: jax.Array):
        """Layer ``i`` after one token per sequence, k, v [B, Hkv, D] (lengths unchanged).

        A model's decode step calls this per layer, then :meth:`with_layers`.
        """
        return self.layers[i].append(k, v, self.lengths, self.config)

    def with_layers(self, layers) -> "KVCache":
        """The cache after every layer received one token per sequence."""
        full = self.lengths >= self.config.capacity
        return dataclasses.replace(
            self,
            layers=tuple(layers),
            lengths=jnp.where(full, self.lengths, self.lengths + 1),
            overflow=self.overflow | full,
        )

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    # ------------------------------------------------------------------ sizes
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def region_sizes(self):
        return region_sizes(self.lengths, self.config)

    def nbytes(self) -> dict[str, int]:
        """Bytes of every stored array, by field path (lengths and flags included)."""
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(self):
            out[jax.tree_util.keystr(path).lstrip(".")] = int(leaf.nbytes)
        return out

    def total_nbytes(self) -> int:
        return sum(self.nbytes().values())

    def bf16_nbytes(self) -> int:
        """Bytes of a dense bf16 K and V cache of the same capacity."""
        return 2 * 2 * self.num_layers * self.batch * self.num_kv_heads * (
            self.config.capacity * self.head_dim
        )


# jit here too, so eager callers get one compiled program instead of hundreds of
# dispatches; inside a caller's jit these inline. The signs are traced, so every
# layer shares one compilation.
@functools.partial(jax.jit, static_argnums=3)
def _prefill_layer(k, v, lengths, cfg: CacheConfig, signs=None):
    return layer_class(cfg).prefill(k, v, lengths, cfg, signs=signs)


@functools.partial(jax.jit, static_argnums=4)
def _append_layers(layers, k, v, lengths, cfg: CacheConfig):
    return tuple(lay.append(k[i], v[i], lengths, cfg) for i, lay in enumerate(layers))


def _check_sizes(cfg: CacheConfig, L, B, H, D) -> tuple[int, int, int, int]:
    """The sizes as Python ints (numpy integers are fine; bools and floats are not)."""
    for name, val in (("num_layers", L), ("batch", B), ("num_kv_heads", H)):
        if not is_int(val) or val <= 0:
            raise ValueError(f"{name}={val!r} must be a positive int")
    cfg.validate_head_dim(D)
    return int(L), int(B), int(H), int(D)


def _check_lengths(lengths, B: int, T: int, cfg: CacheConfig) -> tuple[jax.Array, jax.Array]:
    """lengths [B] as int32, and [B] bool: which were outside [0, T].

    Concrete lengths outside [0, T] raise. Traced ones cannot, so they are clamped to
    [0, T] and flagged (the cache sets those sequences' ``overflow``): a cache is never
    built from an impossible length.
    """
    if T < 1:
        raise ValueError("the prompt has T=0 tokens; from_prefill needs T >= 1 "
                         "(KVCache.create makes an empty cache)")
    if T > cfg.capacity:
        raise ValueError(
            f"prompt of {T} tokens exceeds the cache capacity of {cfg.capacity}; "
            "raise CacheConfig.capacity"
        )
    if not isinstance(lengths, jax.core.Tracer):
        lengths = np.asarray(lengths)  # checked before any cast: int64 must not wrap to int32
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [B]=({B},), got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got {lengths.dtype}")
    if isinstance(lengths, np.ndarray):
        if lengths.min() < 0 or lengths.max() > T:
            raise ValueError(f"lengths must lie in [0, T={T}], got {lengths.tolist()}")
        return jnp.asarray(lengths, jnp.int32), jnp.zeros((B,), bool)
    lengths = lengths.astype(jnp.int32)
    return jnp.clip(lengths, 0, T), (lengths < 0) | (lengths > T)


def check_capacity(cache: KVCache, new_tokens: int) -> None:
    """Host-side check that every sequence can take ``new_tokens`` more tokens."""
    longest = int(np.max(np.asarray(cache.lengths)))
    if longest + new_tokens > cache.config.capacity:
        raise ValueError(
            f"the cache cannot hold {new_tokens} more tokens: the longest sequence has "
            f"{longest} of capacity {cache.config.capacity}"
        )

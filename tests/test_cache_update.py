"""The one-kernel cache write (pallas_kernels/cache_update.py) against XLA's scatters.

The kernel runs in Pallas interpret mode here (CI has no GPU); ``-m gpu`` on a GPU
machine runs it compiled. Every case appends random tokens across sink, ring, flush
and capacity boundaries and compares every leaf of the layer, bit for bit, with the
scatter path (whose cache the oracle tests of test_cache.py check independently).
Compiled, the kernel's flush groups may take the other mode of the hybrid choice
where the two modes' errors tie to rounding; everything else stays bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import innerq_jax.cache as cache_module
from innerq_jax import CacheConfig, KVCache
from innerq_jax.cache import write_rows
from innerq_jax.layout import (
    dequantize_tensor,
    empty_quantized,
    hybrid_agreement,
    quantize_tokens,
    token_block,
)
from pallas_kernels.cache_update import GroupWrite, kernel_can_write
from pallas_kernels.cache_update import write_rows as kernel_write_rows

ON_GPU = jax.default_backend() == "gpu"
KERNEL = "pallas" if ON_GPU else "interpret"

CASES = {
    "innerq": CacheConfig.innerq(bits=2, group_size=16, sink=4, recent=16, capacity=96),
    "outerq-R0": CacheConfig.outerq(bits=2, group_size=16, sink=0, recent=0, capacity=64),
    "recommended-signs": CacheConfig.recommended(group_size=16, sink=3, recent=16, capacity=96,
                                                 rotation_signs=True),
    "K16fp8-4bit": CacheConfig.innerq_h(bits=4, group_size=32, key_group_size=16,
                                        key_scale_dtype="float8_e4m3fn", sink=2, recent=0,
                                        capacity=128),
}


def _assert_same(a, b, where):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    for (path, x), y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (where, path)
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8),
                                      err_msg=f"{where}: {jax.tree_util.keystr(path)}")


def _assert_same_groups(a, b, where, max_flips=0.01):
    """Two quantizations of the same values: the hybrid choice differs in at most
    ``max_flips`` of the groups, and every group where it agrees decodes bit for bit."""
    flips, same = hybrid_agreement(a, b)
    assert float(jnp.mean(flips)) <= max_flips, (where, float(jnp.mean(flips)))
    assert bool(same), where


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_writes_equal_scatters(name, monkeypatch):
    """Every step of a decode from random prompt lengths (inside the sink, at a flush,
    one short of capacity, at capacity): the kernel's layer equals the scatters' layer."""
    cfg = CASES[name]
    B, H, D = 5, 2, 64
    G = cfg.group_size
    lengths = np.array([1, cfg.sink + cfg.recent + G - 1, 37, cfg.capacity - 1,
                        cfg.capacity], np.int32)
    rng = np.random.default_rng(sum(map(ord, name)))
    T = int(lengths.max())
    k = jnp.asarray(rng.standard_normal((1, B, H, T, D)) + 0.3, jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, B, H, T, D)), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, v, jnp.asarray(lengths))
    layer = cache.layer(0)
    scatter = jax.jit(lambda lay, k1, v1, n: lay.append(k1, v1, n, cfg, writer="scatter"))
    kernel = jax.jit(lambda lay, k1, v1, n: lay.append(k1, v1, n, cfg, writer=KERNEL))
    n = jnp.asarray(lengths)
    k1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    with monkeypatch.context() as m:  # every write of this layout goes to the kernel
        m.setattr(cache_module, "_scatter_rows", lambda *a: pytest.fail("a write fell back"))
        if cfg.key_scale_jnp_dtype == jnp.bfloat16:  # ... and the kernel quantizes the groups
            m.setattr(cache_module, "quantize_tokens",
                      lambda *a, **k: pytest.fail("a group was quantized outside the kernel"))
        jax.eval_shape(lambda lay: lay.append(k1, k1, n, cfg, writer=KERNEL), layer)
    a = b = layer
    for step in range(G + 2):  # crosses a flush for every sequence that has a ring
        k1 = jnp.asarray(rng.standard_normal((B, H, D)) * 2, jnp.float32)
        v1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
        a, b = scatter(a, k1, v1, n), kernel(b, k1, v1, n)
        if ON_GPU:  # compiled: the hybrid choice may differ where two errors tie
            a_q, b_q = (a.k, a.v), (b.k, b.v)
            for qa, qb in zip(a_q, b_q):
                _assert_same_groups(qa, qb, f"{name} step {step}")
            b = dataclasses.replace(b, k=a.k, v=a.v)
        _assert_same(a, b, f"{name} step {step}")
        n = jnp.minimum(n + 1, cfg.capacity)
    # the decode really wrote the ring and flushed groups (codes, scales of K and V)
    for field in ("recent_k", "recent_v"):
        assert not np.array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(layer, field)))
    for qt, old in ((a.k, layer.k), (a.v, layer.v)):
        assert not np.array_equal(np.asarray(qt.codes), np.asarray(old.codes))
        assert not np.array_equal(np.asarray(qt.scale).view(np.uint8),
                                  np.asarray(old.scale).view(np.uint8))


def test_blocks_past_the_end_are_not_written():
    """A block that would not fit (start < 0 or start + n > N) or is disabled leaves the
    destination untouched; the others land exactly where asked."""
    rng = np.random.default_rng(3)
    dst = jnp.asarray(rng.integers(0, 2**31, (4, 2, 8, 4)), jnp.uint32)
    src = jnp.asarray(rng.integers(0, 2**31, (4, 2, 2, 4)), jnp.uint32)
    start = jnp.asarray([6, 7, 2, -1], jnp.int32)  # fits, overruns by one, fits, negative
    enabled = jnp.asarray([True, True, False, True])
    (got,) = kernel_write_rows([(dst, src, start, enabled)], interpret=not ON_GPU)
    want = np.asarray(dst).copy()
    want[0, :, 6:8] = np.asarray(src)[0]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_writes_the_kernel_cannot_take_use_scatters(monkeypatch):
    """Non-power-of-two blocks go to scatters, with the same result; the kernel entry
    point itself refuses them with a clear error, as the dispatch does an unknown writer
    (argument or INNERQ_CACHE_WRITER)."""
    rng = np.random.default_rng(4)
    dst = jnp.asarray(rng.standard_normal((2, 3, 10, 6)), jnp.bfloat16)
    src = jnp.asarray(rng.standard_normal((2, 3, 1, 6)), jnp.bfloat16)
    start, en = jnp.asarray([0, 9], jnp.int32), jnp.asarray([True, True])
    assert not kernel_can_write(dst, src)
    a = write_rows([(dst, src, start, en)], "scatter")[0]
    b = write_rows([(dst, src, start, en)], KERNEL)[0]
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="power-of-two"):
        kernel_write_rows([(dst, src, start, en)], interpret=True)
    with pytest.raises(ValueError, match="writer="):
        write_rows([(dst, src, start, en)], "fast")
    monkeypatch.setenv("INNERQ_CACHE_WRITER", "fast")
    with pytest.raises(ValueError, match="INNERQ_CACHE_WRITER='fast'; choose one of"):
        write_rows([(dst, src, start, en)])
    monkeypatch.setenv("INNERQ_CACHE_WRITER", "scatter")  # the environment chooses "auto"
    np.testing.assert_array_equal(np.asarray(write_rows([(dst, src, start, en)])[0], np.float32),
                                  np.asarray(a, np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the compiled kernel")
def test_compiled_kernel_updates_in_place():
    """Under a donated jit the kernel writes the layer's buffers where they are: a step
    that flushes a group changes the codes and keeps their buffer."""
    cfg = CASES["innerq"]  # S 4, R 16, G 16: 51 tokens = 4 + 16 + 2 groups + 15, so the
    B, H, D, T = 4, 2, 64, 51  # next token flushes the third group
    rng = np.random.default_rng(5)
    k = jnp.asarray(rng.standard_normal((1, B, H, T, D)), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, k, jnp.full((B,), T, jnp.int32))
    step = jax.jit(lambda lay, k1, n: lay.append(k1, k1, n, cfg, writer="pallas"),
                   donate_argnums=0)
    layer = cache.layer(0)
    before = np.asarray(layer.k.codes)
    ptr = layer.k.codes.unsafe_buffer_pointer()
    out = step(layer, jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32), cache.lengths)
    assert out.k.codes.unsafe_buffer_pointer() == ptr
    assert not np.array_equal(np.asarray(out.k.codes), before)


GROUP_CASES = {
    "innerq2-G32-D128": (CacheConfig.innerq(capacity=256), 128),
    "innerq4-G64-D64": (CacheConfig.innerq(bits=4, group_size=64, recent=64, capacity=512), 64),
    "outerq2-G32-D128": (CacheConfig.outerq(capacity=256), 128),
    "K16-symmetric-D64": (CacheConfig.innerq(key_group_size=16, hybrid="symmetric",
                                             capacity=256), 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GROUP_CASES))
@pytest.mark.parametrize("which", ["k", "v"])
def test_group_quantized_in_the_kernel_matches_xla(name, which):
    """The kernel's flush group (ring rows at a slot, the token in its row) against
    quantize_tokens run by XLA on the same rows: written at its start where enabled and
    in bounds, nothing else touched. Interpret mode: bit for bit. Compiled: a group may
    take the other hybrid mode only where the two modes' float64 errors tie to 1e-5."""
    cfg, D = GROUP_CASES[name]
    B, H, G, W = 5, 2, cfg.group_size, cfg.window
    rng = np.random.default_rng(sum(map(ord, name + which)))
    ring = rng.standard_normal((B, H, W, D)) * np.exp(rng.uniform(-3, 3, (B, H, 1, D)))
    ring = jnp.asarray(ring + 0.5, jnp.bfloat16)
    token = jnp.asarray(rng.standard_normal((B, H, 1, D)) * 3, jnp.bfloat16)
    slot = jnp.asarray(rng.integers(0, W // G, B) * G, jnp.int32)
    own = jnp.asarray([-1, 0, 5, G - 1, 3], jnp.int32)
    T = cfg.quant_capacity
    start = jnp.asarray([0, G, T - G, T, 2 * G], jnp.int32)  # T: past the end, not written
    enabled = jnp.asarray([True, True, True, True, False])
    grouping = cfg.k_grouping if which == "k" else cfg.v_grouping
    packing = "d" if which == "k" else "t"
    dst = empty_quantized((B, H), T, D, grouping, cfg, packing=packing, which=which)
    # a recognisable old content: every row the kernel must not touch keeps it
    dst = dataclasses.replace(dst, **{
        f: jnp.asarray(rng.integers(0, 2**16, getattr(dst, f).shape), jnp.uint32).astype(
            getattr(dst, f).dtype) if f in ("codes", "mask") else
        jnp.asarray(rng.standard_normal(getattr(dst, f).shape), getattr(dst, f).dtype)
        for f in ("codes", "scale", "zero", "mask")})
    spec = GroupWrite(0, slot, own, dst, start, enabled, cfg, which)
    ring_out, got = kernel_write_rows([(ring, token, slot + own, own >= 0)], [spec],
                                      interpret=not ON_GPU)
    rows = np.arange(G)[None, :] + np.asarray(slot)[:, None]  # [B, G]
    x = np.take_along_axis(np.asarray(ring, np.float32), rows[:, None, :, None], axis=2)
    for b in range(B):
        if own[b] >= 0:
            x[b, :, int(own[b])] = np.asarray(token, np.float32)[b, :, 0]
    want = quantize_tokens(jnp.asarray(x), grouping, cfg, packing=packing, which=which)
    for b in range(B):
        ok = bool(enabled[b]) and int(start[b]) + G <= T
        block = jax.tree_util.tree_map(lambda a: a[b], got)
        old = jax.tree_util.tree_map(lambda a: a[b], dst)
        if not ok:  # untouched
            for f in ("codes", "scale", "zero", "mask"):
                np.testing.assert_array_equal(np.asarray(getattr(block, f)).view(np.uint8),
                                              np.asarray(getattr(old, f)).view(np.uint8))
            continue
        mine = token_block(block, int(start[b]), G)
        ref = jax.tree_util.tree_map(lambda a: a[b], want)
        if not ON_GPU:
            for f in ("codes", "scale", "zero", "mask"):
                np.testing.assert_array_equal(np.asarray(getattr(mine, f)).view(np.uint8),
                                              np.asarray(getattr(ref, f)).view(np.uint8),
                                              err_msg=f"{name} {which} b={b} {f}")
        else:
            flips, same = hybrid_agreement(mine, ref)
            flips = np.asarray(flips)
            assert bool(same), (name, which, b)
            xm, xr = np.asarray(dequantize_tensor(mine)), np.asarray(dequantize_tensor(ref))
            if flips.any():  # each flipped group's two errors tie
                err = lambda xh: np.where(flips, (xh - x[b]) ** 2, 0.0)  # noqa: E731
                ea, eb = err(xm.astype(np.float64)).sum(), err(xr.astype(np.float64)).sum()
                assert abs(ea - eb) <= 1e-5 * max(ea, eb), (name, which, b, ea, eb)
    # the ring got the token where it had a row, nothing else
    want_ring = np.asarray(ring, np.float32).copy()
    for b in range(B):
        if own[b] >= 0:
            want_ring[b, :, int(slot[b] + own[b])] = np.asarray(token, np.float32)[b, :, 0]
    np.testing.assert_array_equal(np.asarray(ring_out, np.float32), want_ring)


@pytest.mark.parametrize("name", ["innerq", "recommended-signs", "outerq-R0"])
def test_append_lowers_to_one_triton_call(name):
    """On a GPU (lowered here for an abstract H200) a quantized layer's append is one
    Triton kernel: no reduction left to XLA (the group's quantization is in the kernel),
    and a layout the kernel cannot quantize (fp8 key scales) keeps XLA's."""
    from kernel_cases import cuda_ops

    cfg = CASES[name]
    B, H, D = 2, 2, 64
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, H, D).layer(0))
    kv = jax.ShapeDtypeStruct((B, H, D), jnp.float32)
    n = jax.ShapeDtypeStruct((B,), jnp.int32)
    ops, text = cuda_ops(jax.jit(lambda lay, k1, v1, m: lay.append(k1, v1, m, cfg,
                                                                   writer="pallas")),
                         layer, kv, kv, n)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "reduce" not in ops and "scatter" not in ops, sorted(set(ops))
    fp8 = CASES["K16fp8-4bit"]
    layer = jax.eval_shape(lambda: KVCache.create(fp8, 1, B, H, D).layer(0))
    ops, text = cuda_ops(jax.jit(lambda lay, k1, v1, m: lay.append(k1, v1, m, fp8,
                                                                   writer="pallas")),
                         layer, kv, kv, n)
    assert text.count("__gpu$xla.gpu.triton") == 1 and "reduce" in ops


def test_group_writes_the_kernel_cannot_take_are_refused():
    """A group the kernel cannot quantize (fp8 key scales), a ring index that names no
    write and per-sequence arrays of the wrong shape each get a clear error."""
    cfg = CASES["K16fp8-4bit"]
    B, H, D = 2, 2, 64
    layer = KVCache.create(cfg, 1, B, H, D).layer(0)
    token = jnp.ones((B, H, 1, D), jnp.bfloat16)
    zeros, no = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)
    write = (layer.recent_k, token, zeros, no)
    bad = GroupWrite(0, zeros, zeros - 1, layer.k, zeros, no, cfg, "k")
    with pytest.raises(ValueError, match="needs bf16 scales"):
        kernel_write_rows([write], [bad], interpret=True)
    ok_cfg = CASES["innerq"]
    lay = KVCache.create(ok_cfg, 1, B, H, D).layer(0)
    write = (lay.recent_k, token, zeros, no)
    with pytest.raises(ValueError, match="names ring write 3; there are 1 writes"):
        kernel_write_rows([write], [GroupWrite(3, zeros, zeros, lay.k, zeros, no, ok_cfg, "k")],
                          interpret=True)
    with pytest.raises(ValueError, match=r"has own \(3,\); it must be \[B\] = \[2\]"):
        kernel_write_rows([write], [GroupWrite(0, zeros, jnp.zeros((3,), jnp.int32), lay.k,
                                               zeros, no, ok_cfg, "k")], interpret=True)


def test_bad_group_warps_from_the_environment_are_refused(monkeypatch):
    cfg = CASES["innerq"]
    B, H, D = 2, 2, 64
    layer = KVCache.create(cfg, 1, B, H, D).layer(0)
    kv, n = jnp.ones((B, H, D), jnp.float32), jnp.zeros((B,), jnp.int32)
    monkeypatch.setenv("INNERQ_GROUP_WARPS", "6")
    with pytest.raises(ValueError, match="INNERQ_GROUP_WARPS='6'; allowed: 1, 2, 4, 8, 16 or 32"):
        jax.eval_shape(lambda lay: lay.append(kv, kv, n, cfg, writer="interpret"), layer)


@pytest.mark.parametrize("name", ["innerq", "recommended-signs"])
def test_append_with_counters_zeroes_the_attention_ops_counters(name):
    """The write kernel also writes the fused attention op's done-counters, [H, B] int32
    zeros (an output left unwritten would read the interpreter's fill, the int32 minimum),
    beside the same layer ``append`` gives; appends that run on XLA's scatters give none."""
    cfg = CASES[name]
    B, H, D = 3, 2, 64
    rng = np.random.default_rng(7)
    lengths = jnp.asarray([5, 40, cfg.capacity - 1], jnp.int32)
    T = int(lengths.max())
    k = jnp.asarray(rng.standard_normal((1, B, H, T, D)) + 0.2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, B, H, T, D)), jnp.float32)
    layer = KVCache.from_prefill(cfg, k, v, lengths).layer(0)
    k1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    v1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    got, counters = jax.jit(lambda lay: lay.append_with_counters(k1, v1, lengths, cfg,
                                                                 writer=KERNEL))(layer)
    assert counters.shape == (H, B) and counters.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(counters), 0)
    _assert_same(got, layer.append(k1, v1, lengths, cfg, writer=KERNEL), name)
    _, none = layer.append_with_counters(k1, v1, lengths, cfg, writer="scatter")
    assert none is None


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_unquantized_layers_append_with_no_counters(kind):
    """Every layer class takes append_with_counters (the model's step calls it whatever the
    cache): the bf16 and int8 layers give append's layer, leaf for leaf, and no counters."""
    cfg = {"bf16": CacheConfig.bf16, "int8": CacheConfig.int8}[kind](capacity=64)
    B, H, D = 2, 2, 32
    rng = np.random.default_rng(3)
    lengths = jnp.asarray([9, 63], jnp.int32)
    k = jnp.asarray(rng.standard_normal((1, B, H, 63, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, B, H, 63, D)), jnp.float32)
    layer = KVCache.from_prefill(cfg, k, v, lengths).layer(0)
    k1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    v1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    got, counters = layer.append_with_counters(k1, v1, lengths, cfg)
    assert counters is None
    want = layer.append(k1, v1, lengths, cfg)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(got.k), np.asarray(layer.k))  # the token landed

"""The one-kernel cache write (pallas_kernels/cache_update.py) against XLA's scatters.

The kernel runs in Pallas interpret mode here (CI has no GPU); ``-m gpu`` on a GPU
machine runs it compiled. Every case appends random tokens across sink, ring, flush
and capacity boundaries and compares every leaf of the layer, bit for bit, with the
scatter path (whose cache the oracle tests of test_cache.py check independently).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import innerq_jax.cache as cache_module
from innerq_jax import CacheConfig, KVCache
from innerq_jax.cache import write_rows
from pallas_kernels.cache_update import kernel_can_write
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
        jax.eval_shape(lambda lay: lay.append(k1, k1, n, cfg, writer=KERNEL), layer)
    a = b = layer
    for step in range(G + 2):  # crosses a flush for every sequence that has a ring
        k1 = jnp.asarray(rng.standard_normal((B, H, D)) * 2, jnp.float32)
        v1 = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
        a, b = scatter(a, k1, v1, n), kernel(b, k1, v1, n)
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

"""jax.vmap over the Pallas kernels (interpret mode on the CPU).

Each Triton kernel launch goes through ``triton_ext.call_quietly``, a primitive that
lowers the ``pallas_call`` inside a filter for the Triton backend's deprecation warning;
it carries a batching rule. The cache-write kernel is batched by Pallas itself, the TPU
kernel one call per element. So vmapping a decode step (over queries, over whole caches)
works and gives what the calls one by one give, which the reference confirms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import cache_after_appends
from innerq_jax import CacheConfig
from innerq_jax.attention import decode_attention_layer
from innerq_jax.reference import prepare_query
from pallas_kernels.key_scores import key_scores_reference, quantized_key_scores
from pallas_kernels.mgpu_epilogue import merge_partials
from pallas_kernels.mgpu_geometry import Geometry
from pallas_kernels import mgpu_decode as md
from pallas_kernels.mgpu_query import query_operands_kernel


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-5, atol=1e-6)


CFG = CacheConfig.innerq(capacity=512)
B, HKV, HQ, D = 2, 2, 4, 64


@pytest.fixture(scope="module")
def caches():
    """Two caches of the same shape, different contents and lengths (a full sequence,
    one inside the first quantized group, one recent-only)."""
    return [cache_after_appends(CFG, B, HKV, D, lengths, appends=2, seed=seed)
            for seed, lengths in ((0, [470, 4 + 128 + 7]), (1, [60, 300]))]


def test_decode_over_queries(caches):
    """The fused kernel through the dispatch, vmapped over three queries of one cache."""
    cache = caches[0]
    layer = cache.layer(0)
    qs = jax.random.normal(jax.random.PRNGKey(2), (2, B, HQ, D), jnp.float32)

    def step(q):
        return decode_attention_layer(q, layer, cache.lengths, CFG, backend="interpret")

    out = jax.jit(jax.vmap(step))(qs)
    assert out.shape == (2, B, HQ, D)
    for i in range(2):
        _close(out[i], step(qs[i]))
        ref = decode_attention_layer(qs[i], layer, cache.lengths, CFG, backend="reference")
        assert _rel(out[i], ref) < 1e-2


def test_decode_over_caches(caches):
    """The same kernel vmapped over (query, cache layer, lengths): two whole caches."""
    layers = [c.layer(0) for c in caches]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    lengths = jnp.stack([c.lengths for c in caches])
    qs = jax.random.normal(jax.random.PRNGKey(3), (2, B, HQ, D), jnp.float32)

    def step(q, layer, n):
        return decode_attention_layer(q, layer, n, CFG, backend="interpret")

    out = jax.vmap(step)(qs, stacked, lengths)
    for i, c in enumerate(caches):
        _close(out[i], step(qs[i], layers[i], c.lengths))
        ref = decode_attention_layer(qs[i], layers[i], c.lengths, CFG, backend="reference")
        assert _rel(out[i], ref) < 1e-2


def test_append_over_caches(caches):
    """The cache-write kernel (the flush groups quantized in it) vmapped over two caches
    gives each cache's own append, bit for bit."""
    layers = [c.layer(0) for c in caches]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    lengths = jnp.stack([c.lengths for c in caches])
    k, v = (jax.random.normal(jax.random.PRNGKey(s), (2, B, HKV, D), jnp.float32)
            for s in (8, 9))
    out = jax.vmap(lambda lay, a, b, n: lay.append(a, b, n, CFG, writer="interpret"))(
        stacked, k, v, lengths)
    for i, layer in enumerate(layers):
        one = layer.append(k[i], v[i], caches[i].lengths, CFG, writer="interpret")
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
        # the token really went in (the ring holds it)
        assert not np.array_equal(np.asarray(one.recent_k), np.asarray(layer.recent_k))


def test_tpu_kernel_over_caches(caches):
    """The TPU kernel (Pallas' TPU interpreter) vmapped over queries and whole caches:
    one kernel call per element (Pallas' own batching leaves the grid's dimension semantics
    one short, which the TPU lowering rejects)."""
    from pallas_kernels.tpu_decode import quantized_decode_attention_tpu

    layers = [c.layer(0) for c in caches]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    lengths = jnp.stack([c.lengths for c in caches])
    q = jax.random.normal(jax.random.PRNGKey(10), (2, B, HQ, D), jnp.float32)
    qp = jnp.stack([prepare_query(q[i], layers[i], CFG, 1 / math.sqrt(D)) for i in range(2)])

    def op(x, layer, n):
        return quantized_decode_attention_tpu(x, layer, n, CFG, interpret=True)

    # (each element interprets the kernel once: a few seconds each on the CPU, so the
    # queries-only form, the same rule with the cache closed over, is left to the Triton
    # tests above)
    over_caches = jax.vmap(op)(qp, stacked, lengths)
    ones = [op(qp[i], layers[i], caches[i].lengths) for i in range(2)]
    for i in range(2):
        _close(over_caches[i], ones[i])
        assert _rel(ones[i], md.mgpu_decode_attention_reference(
            qp[i], layers[i], caches[i].lengths, CFG)) < 1e-2


def test_key_scores_over_queries(caches):
    """The key-scores kernel (the two-kernel path's first) vmapped over prepared queries."""
    layer = caches[1].layer(0)
    q = jax.random.normal(jax.random.PRNGKey(4), (2, B, HQ, D), jnp.float32)
    qp = jax.vmap(lambda x: prepare_query(x, layer, CFG, 1 / math.sqrt(D)))(q)
    out = jax.vmap(lambda x: quantized_key_scores(x, layer.k, interpret=True))(qp)
    for i in range(2):
        _close(out[i], quantized_key_scores(qp[i], layer.k, interpret=True))
        assert _rel(out[i], key_scores_reference(qp[i], layer.k)) < 1e-2


def test_mosaic_side_kernels_over_a_batch(caches):
    """The Mosaic op's Triton launches: the query kernel vmapped over queries, the merge
    over random split partials."""
    cache = caches[0]
    layer = cache.layer(0)
    geo = Geometry(CFG.bits, CFG.group_size, D, HQ // HKV, 128)
    q = jax.random.normal(jax.random.PRNGKey(5), (2, B, HQ, D), jnp.float32)
    qp = jax.vmap(lambda x: prepare_query(x, layer, CFG, 1 / math.sqrt(D)))(q)

    def operands(x):
        return query_operands_kernel(x, geo, layer, cache.lengths, CFG, interpret=True)

    got = jax.vmap(operands)(qp)
    for i in range(2):
        for a, b in zip(got, operands(qp[i])):
            _close(a[i], b)
        qexp, kconst = md.query_operands(qp[i], geo)
        _close(got[0][i].reshape(qexp.shape), qexp)
        _close(got[1][i], kconst)

    rng = np.random.default_rng(6)
    NS = 3
    o_part = rng.standard_normal((2, B, HKV, NS, D, geo.NV)).astype(np.float32)
    ml_part = np.stack([rng.standard_normal((2, B, HKV, NS, geo.NV)) * 3,
                        rng.uniform(0.2, 2.0, (2, B, HKV, NS, geo.NV))], axis=4).astype(np.float32)
    merge = jax.vmap(lambda o, m: merge_partials(o, m, geo, HQ // HKV, interpret=True))
    out = merge(jnp.asarray(o_part), jnp.asarray(ml_part))
    for i in range(2):
        ref = md.combine_partials(jnp.asarray(o_part[i]), jnp.asarray(ml_part[i]), None, geo)
        _close(out[i], merge_partials(jnp.asarray(o_part[i]), jnp.asarray(ml_part[i]), geo,
                                      HQ // HKV, interpret=True))
        assert _rel(out[i], ref) < 1e-5


def test_finishing_epilogue_under_vmap():
    """The epilogue that undoes a value rotation itself (finish_values: a done-counter per
    (sequence, kv head), the last channel block's program rotating the merged rows) under
    jax.vmap over queries and partials: each element what its own call gives, and the
    element's XLA merge and finish (interpret mode)."""
    import dataclasses

    from innerq_jax.cache import KVCache
    from innerq_jax.reference import finish_output
    from pallas_kernels.mgpu_epilogue import column_heads, windows_and_merge

    cfg = dataclasses.replace(CacheConfig.recommended(capacity=704), rotation_signs=True)
    B, H, D, Hq, NS = 2, 2, 128, 8, 3
    rng = np.random.default_rng(9)
    k = jnp.asarray(rng.standard_normal((1, B, H, 600, D)), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, k * 0.7 + 0.3, jnp.array([600, 250]))
    layer = cache.layer(0)
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // H, 128)
    qs = jnp.asarray(rng.standard_normal((2, B, Hq, D)), jnp.float32)
    qp = jnp.stack([prepare_query(q, layer, cfg, D ** -0.5).reshape(B, H, Hq // H, D)
                    for q in qs])
    o_part = jnp.asarray(rng.standard_normal((2, B, H, NS, D, geo.NV)), jnp.float32)
    # the Mosaic kernel's partials repeat a head's running max over the head's columns
    head = np.asarray(column_heads(geo, Hq // H, geo.NV))
    m_head = rng.standard_normal((2, B, H, NS, Hq // H)) * 3
    ml_part = jnp.asarray(np.stack([m_head[..., np.maximum(head, 0)],
                                    rng.uniform(0.2, 2.0, (2, B, H, NS, geo.NV))], axis=4),
                          jnp.float32)

    def finished(q, o, m):
        return windows_and_merge(q, layer, cache.lengths, cfg, o, m, geo, n_channel_blocks=4,
                                 finish_values=True, interpret=True)

    out = jax.vmap(finished)(qp, o_part, ml_part)
    for i in range(2):
        _close(out[i], finished(qp[i], o_part[i], ml_part[i]))
        window = md.window_partial(qp[i], layer, cache.lengths, cfg)
        merged = md.combine_partials(o_part[i], ml_part[i], window, geo)
        with jax.default_matmul_precision("highest"):
            ref = finish_output(merged, cfg, jnp.float32, layer.rot_signs).reshape(merged.shape)
        assert _rel(out[i], ref) < 1e-5


# the Mosaic GPU op as the H200 runs it (windows and merge in the Triton epilogue, the query
# operands from the Triton query kernel), vmapped over queries
_MOSAIC = dict(num_splits=2, windows="epilogue", query="kernel", wide_copies=True)


def test_mosaic_op_lowers_under_vmap():
    """vmap reaches the Mosaic kernel and both Triton launches (lowered for an abstract
    H200; running it needs one)."""
    from jax.sharding import use_abstract_mesh

    from innerq_jax import KVCache
    from kernel_cases import abstract_h200

    cfg = CacheConfig.innerq(capacity=640)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, 2, 2, 128).layer(0))
    qp = jax.ShapeDtypeStruct((3, 2, 2, 4, 128), jnp.float32)
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    f = jax.jit(jax.vmap(lambda q, lay, n: md.mgpu_decode_attention(q, lay, n, cfg, **_MOSAIC),
                         in_axes=(0, None, None)))
    with use_abstract_mesh(abstract_h200()):
        text = f.trace(qp, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert text.count("__gpu$xla.gpu.triton") == 2  # the query kernel and the epilogue


def _hopper():
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    return devs[0] if devs and getattr(devs[0], "compute_capability", "0").startswith("9") else None


@pytest.mark.gpu
def test_gpu_mosaic_op_over_queries():
    """The compiled Mosaic op vmapped over queries equals its calls one by one."""
    if _hopper() is None:
        pytest.skip("needs a Hopper GPU (sm_90): the Mosaic GPU kernel runs only there")
    cfg = CacheConfig.innerq(capacity=640)
    cache = cache_after_appends(cfg, 2, 2, 128, [630, 140], appends=2)
    layer = cache.layer(0)
    q = jax.random.normal(jax.random.PRNGKey(7), (3, 2, 8, 128), jnp.float32)
    qp = jax.vmap(lambda x: prepare_query(x, layer, cfg, 1 / math.sqrt(128)))(q)

    def op(x):
        return md.mgpu_decode_attention(x, layer, cache.lengths, cfg, **_MOSAIC)

    out = jax.jit(jax.vmap(op))(qp)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(jax.jit(op)(qp[i])),
                                   rtol=1e-5, atol=1e-6)
        assert _rel(out[i], md.mgpu_decode_attention_reference(
            qp[i], layer, cache.lengths, cfg)) < 1e-2

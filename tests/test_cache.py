"""The functional cache: life cycle properties, capacity, jit, memory, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innerq_jax import (
    CacheConfig,
    KVCache,
    check_capacity,
    decode_attention,
    decode_attention_layer,
)
from innerq_jax.cache import QuantLayer


def _kv(seed, shape):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape) + 0.5 * rng.standard_normal(shape[-1])  # per-channel offsets
    k += 6 * (rng.random(shape) < 0.01)
    v = rng.standard_normal(shape)
    return jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32)


def _expected_stored_keys(k_raw, layer, b, h, cfg):
    """Oracle of the stored key space: (k - mu) [rotated] / sigma, float64."""
    mu = np.asarray(layer.k_centre[b, h], np.float64)
    sigma = np.asarray(layer.k_scale[b, h], np.float64)
    x = np.asarray(k_raw, np.float64) - mu
    if cfg.rotate_keys:
        x = x @ oracle.hadamard(x.shape[-1])
    return x / sigma


def _expected_stored_values(v_raw, cfg):
    x = np.asarray(v_raw, np.float64)
    return x @ oracle.hadamard(x.shape[-1]) if cfg.rotate_values else x


def _check_sequence(cache, k_all, v_all, b, cfg):
    """Every region of sequence b holds exactly its own tokens (window or quantized)."""
    length = int(cache.lengths[b])
    sizes = cache.region_sizes()
    S, G, R = cfg.sink, cfg.group_size, cfg.recent
    sink, nq, rec = int(sizes.sink[b]), int(sizes.quantized[b]), int(sizes.recent[b])
    assert sink == min(length, S)
    assert nq % G == 0 and nq <= cfg.quant_capacity
    rest = length - sink
    assert min(rest, R) <= rec <= R + G - 1 or rest == 0
    assert sink + nq + rec == length
    layer = cache.layer(0)
    for h in range(k_all.shape[2]):
        ks, vs, lab = oracle.materialize(layer, b, h, length, cfg)
        assert len(lab) == length
        want_k = _expected_stored_keys(k_all[0, b, h, :length], layer, b, h, cfg)
        want_v = _expected_stored_values(v_all[0, b, h, :length], cfg)
        win = lab != "quant"
        # windows: bf16 copies of the stored-space token
        np.testing.assert_allclose(ks[win], want_k[win], rtol=8e-3, atol=1e-5)
        np.testing.assert_allclose(vs[win], want_v[win], rtol=8e-3, atol=1e-5)
        q = lab == "quant"
        if q.any():
            # quantized: within half a step of its own group (stored scale)
            for qt, got, want in ((layer.k, ks, want_k), (layer.v, vs, want_v)):
                s = np.asarray(qt.scale[b, h], np.float64)
                s = np.repeat(s, G, axis=-1 if qt.grouping == "d" else -2)[: q.sum()]
                err = np.abs(got[q] - want[q])
                # bf16 rounding of the window copy a group was quantized from: 2^-8 relative
                assert np.all(err <= s / 2 * 1.01 + 4e-3 * np.abs(want[q]) + 1e-5), err.max()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(["innerq", "outerq"]),
    bits=st.sampled_from([2, 4]),
    G=st.sampled_from([16, 32]),
    D=st.sampled_from([32, 64]),
    S=st.integers(0, 5),
    R_groups=st.integers(0, 2),
    rotation=st.sampled_from(["none", "keys_values"]),
)
def test_life_cycle_properties(data, kind, bits, G, D, S, R_groups, rotation):
    R = R_groups * G
    if kind == "outerq":
        rotation = "none"
    cap = S + R + G + G * data.draw(st.integers(2, 5))
    cap = -(-cap // G) * G
    cfg = CacheConfig(kind=kind, bits=bits, group_size=G, sink=S, recent=R, capacity=cap,
                      rotation=rotation)
    B, H = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    T = data.draw(st.integers(1, cap - 40 if cap > 60 else 1))
    lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    lengths[0] = T
    n_steps = data.draw(st.integers(0, 40))
    k_all, v_all = _kv(int(lengths.sum()), (1, B, H, T + n_steps, D))
    cache = KVCache.from_prefill(cfg, k_all[:, :, :, :T], v_all[:, :, :, :T], lengths)
    # appends: sequence b's i-th new token is its token lengths[b] + i of k_all
    kk, vv = np.asarray(k_all), np.asarray(v_all)
    append = jax.jit(KVCache.append)
    for i in range(n_steps):
        pos = lengths + i
        k_new = np.stack([kk[0, b, :, pos[b]] for b in range(B)])[None]
        v_new = np.stack([vv[0, b, :, pos[b]] for b in range(B)])[None]
        cache = append(cache, jnp.asarray(k_new), jnp.asarray(v_new))
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.minimum(lengths + n_steps, cap))
    for b in range(B):
        _check_sequence(cache, kk, vv, b, cfg)


def test_key_statistics_match_oracle():
    cfg = CacheConfig.innerq(capacity=512)
    k, v = _kv(0, (1, 2, 2, 300, 64))
    lengths = np.array([300, 40])
    cache = KVCache.from_prefill(cfg, k, v, lengths)
    lay = cache.layer(0)
    for b in range(2):
        x = np.asarray(k[0, b, :, cfg.sink : lengths[b]], np.float64)  # [H, n, D]
        mu = x.mean(1)
        sigma = np.maximum(np.abs(x - mu[:, None]).max(1), cfg.norm_eps)
        np.testing.assert_allclose(np.asarray(lay.k_centre[b]), mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(lay.k_scale[b]), sigma, rtol=1e-5)
    std = KVCache.from_prefill(cfg.replace(key_scale="std"), k, v, lengths).layer(0)
    x = np.asarray(k[0, 0, :, cfg.sink :], np.float64)
    np.testing.assert_allclose(np.asarray(std.k_scale[0]), x.std(1), rtol=1e-4)
    # no tokens past the sinks: identity normalization
    short = KVCache.from_prefill(cfg, k[:, :, :, :3], v[:, :, :, :3], np.array([3, 2])).layer(0)
    assert np.all(np.asarray(short.k_centre) == 0) and np.all(np.asarray(short.k_scale) == 1)


@pytest.mark.parametrize("key_scale", ["absmax", "std"])
def test_padding_never_matters(key_scale):
    """NaN and Inf past a sequence's length change nothing: not the key statistics,
    not a stored array, not the attention (the repro: NaN at token 310 of a 300-token
    sequence made the whole output NaN)."""
    cfg = CacheConfig.innerq(capacity=352, key_scale=key_scale)
    k, v = _kv(6, (1, 2, 2, 352, 64))
    lengths = np.array([300, 200])
    clean = KVCache.from_prefill(cfg, k, v, lengths)
    k_bad = k.at[0, 0, 0, 310, 5].set(jnp.nan).at[0, 1, :, 200:].set(jnp.inf)
    v_bad = v.at[0, 0, :, 300:].set(jnp.nan).at[0, 1, 1, 250, 3].set(-jnp.inf)
    dirty = KVCache.from_prefill(cfg, k_bad, v_bad, lengths)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 64))
    out = np.asarray(decode_attention(q, dirty, backend="reference"))
    assert np.all(np.isfinite(out))


def test_nan_sink_token_touches_only_its_own_attention():
    """Sink tokens are outside the key statistics, so a NaN there leaves the statistics and
    every other stored token alone; only the attention that reads it (its sequence and
    kv head) turns NaN."""
    cfg = CacheConfig.innerq(capacity=352)
    k, v = _kv(7, (1, 2, 2, 300, 64))
    lengths = np.array([300, 250])
    clean = KVCache.from_prefill(cfg, k, v, lengths)
    dirty = KVCache.from_prefill(cfg, k.at[0, 0, 0, 1, 5].set(jnp.nan), v, lengths)
    a, b = clean.layer(0), dirty.layer(0)
    np.testing.assert_array_equal(np.asarray(a.k_centre), np.asarray(b.k_centre))
    np.testing.assert_array_equal(np.asarray(a.k_scale), np.asarray(b.k_scale))
    nan_at = np.zeros(a.sink_k.shape, bool)
    nan_at[0, 0, 1, 5] = True
    np.testing.assert_array_equal(np.isnan(np.asarray(b.sink_k, np.float32)), nan_at)
    np.testing.assert_array_equal(np.asarray(a.sink_k)[~nan_at], np.asarray(b.sink_k)[~nan_at])
    for x, y in zip(jax.tree.leaves(dataclasses.replace(a, sink_k=None)),
                    jax.tree.leaves(dataclasses.replace(b, sink_k=None))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    q = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 64))
    got = np.array(decode_attention(q, dirty, backend="reference")).reshape(2, 2, 2, 64)
    want = np.asarray(decode_attention(q, clean, backend="reference")).reshape(2, 2, 2, 64)
    assert np.all(np.isnan(got[0, 0]))
    got[0, 0] = want[0, 0]
    np.testing.assert_array_equal(got, want)


def test_append_at_capacity_never_writes():
    cfg = CacheConfig.innerq(group_size=16, sink=2, recent=16, capacity=64)
    k, v = _kv(1, (1, 2, 1, 64, 32))
    cache = KVCache.from_prefill(cfg, k[:, :, :, :60], v[:, :, :, :60], np.array([60, 10]))
    for i in range(4):
        cache = cache.append(k[:, :, :, 60 + i], v[:, :, :, 60 + i])
    assert cache.lengths.tolist() == [64, 14] and cache.overflow.tolist() == [False, False]
    full = jax.tree.map(lambda x: np.array(x), cache.layers)
    k_extra, v_extra = _kv(2, (1, 2, 1, 32))
    for _ in range(3):
        cache = cache.append(k_extra * 100, v_extra * 100)
    assert cache.lengths.tolist() == [64, 17]
    assert cache.overflow.tolist() == [True, False]
    # sequence 0 is untouched everywhere; sequence 1 kept growing
    for before, after in zip(jax.tree.leaves(full), jax.tree.leaves(cache.layers)):
        np.testing.assert_array_equal(before[0], np.asarray(after)[0])
    with pytest.raises(ValueError, match="cannot hold 1 more tokens"):
        check_capacity(cache, 1)
    check_capacity(KVCache.create(cfg, 1, 1, 1, 32), 64)


def test_decode_loop_compiles_once_and_donates():
    cfg = CacheConfig.innerq(group_size=16, recent=32, capacity=512)
    L, B, H, Hq, D = 2, 2, 2, 4, 64
    k, v = _kv(3, (L, B, H, 256, D))
    cache = KVCache.from_prefill(cfg, k[:, :, :, :40], v[:, :, :, :40], np.array([40, 17]))
    traces = []

    def step(cache, k_new, v_new, q):
        traces.append(1)
        cache = cache.append(k_new, v_new)
        return cache, decode_attention(q, cache, layer=1, backend="reference")

    step = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(0)
    for i in range(200):
        old = cache
        q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
        cache, out = step(cache, k[:, :, :, i % 256], v[:, :, :, i % 256], q)
        assert out.shape == (B, Hq, D) and bool(jnp.all(jnp.isfinite(out)))
    assert len(traces) == 1
    assert old.lengths.is_deleted()  # the input buffers were donated
    assert cache.lengths.tolist() == [240, 217]
    assert int(cache.region_sizes().quantized[0]) == (240 - 4 - 32) // 16 * 16


def test_memory_llama3_8b_shape_32k():
    cfg = CacheConfig.innerq(bits=2, group_size=32, capacity=32768)
    cache = KVCache.create(cfg, num_layers=1, batch=1, num_kv_heads=8, head_dim=128)
    sizes = cache.nbytes()
    total = sum(sizes.values())
    assert total == cache.total_nbytes()
    assert total <= 0.2 * cache.bf16_nbytes(), total / cache.bf16_nbytes()
    tq = cfg.quant_capacity
    assert sizes["layers[0].k.codes"] == 8 * tq * 128 * 2 // 8
    assert sizes["layers[0].v.codes"] == 8 * tq * 128 * 2 // 8
    assert sizes["layers[0].k.mask"] == 8 * tq * 128 // 32 // 8
    assert sizes["layers[0].recent_k"] == 8 * (128 + 32) * 128 * 2
    # the sum of fields is what the arrays really occupy
    assert total == sum(x.nbytes for x in jax.tree.leaves(cache))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits=3"),
        (dict(group_size=24), "group_size=24"),
        (dict(recent=100), "recent=100"),
        (dict(capacity=1000), "capacity=1000"),
        (dict(capacity=128), "at least sink"),
        (dict(sink=-1), "sink=-1"),
        (dict(hybrid="best"), "hybrid='best'"),
        (dict(key_norm="whiten"), "key_norm='whiten'"),
        (dict(key_scale="mad"), "key_scale='mad'"),
        (dict(rotation="values"), "rotation='values'"),
        (dict(scale_dtype="float32"), "scale_dtype='float32'"),
        (dict(kind="fp8"), "kind='fp8'"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(kind="outerq", rotation="keys"), "only defined for kind='innerq'"),
        (dict(bits=4.0), r"bits=4\.0"),
        (dict(group_size=32.0), r"group_size=32\.0"),
        (dict(sink=True), "sink=True"),
        (dict(recent=128.0), r"recent=128\.0"),
        (dict(capacity=np.float64(4096)), "capacity="),
        (dict(norm_eps=float("inf")), "norm_eps=inf"),
        (dict(norm_eps=float("nan")), "norm_eps=nan"),
        (dict(norm_eps=True), "norm_eps=True"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_bad_shapes_raise_clear_errors():
    cfg = CacheConfig.innerq(capacity=512)
    k, v = _kv(4, (1, 2, 2, 100, 64))
    with pytest.raises(ValueError, match="group_size=32 must divide head_dim=48"):
        KVCache.create(cfg, 1, 1, 1, 48)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        KVCache.create(CacheConfig.innerq_h(capacity=512), 1, 1, 1, 96)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        KVCache.from_prefill(cfg, k, v[..., :32], np.array([100, 100]))
    with pytest.raises(ValueError, match="expected k/v with 5 dims"):
        KVCache.from_prefill(cfg, k[0], v[0], np.array([100, 100]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        KVCache.from_prefill(cfg, k, v, np.array([100]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        KVCache.from_prefill(cfg, k, v, np.array([101, 5]))
    with pytest.raises(ValueError, match="lengths must be integers"):
        KVCache.from_prefill(cfg, k, v, np.array([1.0, 5.0]))
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        KVCache.from_prefill(cfg.replace(capacity=192), k[:, :, :, :100].repeat(2, 3),
                             v[:, :, :, :100].repeat(2, 3), np.array([1, 1]))
    with pytest.raises(ValueError, match="must be floating point"):
        KVCache.from_prefill(cfg, k.astype(jnp.int32), v, np.array([1, 1]))
    cache = KVCache.from_prefill(cfg, k, v, np.array([100, 7]))
    with pytest.raises(ValueError, match=r"shape .* != \[L, B, Hkv, D\]"):
        cache.append(k[:, :, :, 0, :32], v[:, :, :, 0, :32])
    q = jnp.ones((2, 3, 64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(q, cache)
    with pytest.raises(ValueError, match="does not match the cache"):
        decode_attention(jnp.ones((2, 4, 32)), cache)
    with pytest.raises(ValueError, match=r"layer=3 must be an int in \[0, 1\)"):
        decode_attention(jnp.ones((2, 4, 64)), cache, layer=3)
    with pytest.raises(ValueError, match="backend='cuda'"):
        decode_attention(jnp.ones((2, 4, 64)), cache, backend="cuda")
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(jnp.ones((2, 4, 64, 1)), cache)


def test_lengths_under_jit_are_clamped_and_flagged():
    """Under jit lengths cannot raise: each out-of-range one is clamped to [0, T] and its
    sequence's overflow flag set, and the cache is the one of the clamped lengths (never
    300 "recent" tokens in a 160-slot ring or a negative sink). Outside jit they raise."""
    cfg = CacheConfig.innerq(capacity=256)
    k, v = _kv(8, (1, 3, 2, 200, 64))
    build = jax.jit(lambda k, v, n: KVCache.from_prefill(cfg, k, v, n))
    got = build(k, v, jnp.array([400, -3, 150]))
    assert got.lengths.tolist() == [200, 0, 150]
    assert got.overflow.tolist() == [True, True, False]
    want = KVCache.from_prefill(cfg, k, v, np.array([200, 0, 150]))
    assert want.overflow.tolist() == [False, False, False]
    for a, b in zip(jax.tree.leaves(got.layers), jax.tree.leaves(want.layers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=200\], got \[400, -3, 150\]"):
        KVCache.from_prefill(cfg, k, v, np.array([400, -3, 150]))


def test_odd_inputs_get_clear_errors():
    cfg = CacheConfig.innerq(capacity=512)
    k, v = _kv(9, (1, 2, 2, 100, 64))
    # int64 lengths are checked before any conversion to int32 (2**32 + 5 is not 5)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=100\], got \[4294967301, 5\]"):
        KVCache.from_prefill(cfg, k, v, np.array([2**32 + 5, 5], np.int64))
    with pytest.raises(ValueError, match="lengths must be integers, got bool"):
        KVCache.from_prefill(cfg, k, v, np.array([True, True]))
    with pytest.raises(ValueError, match="T=0 tokens"):
        KVCache.from_prefill(cfg, k[:, :, :, :0], v[:, :, :, :0], np.array([0, 0]))
    cache = KVCache.from_prefill(cfg, k, v, np.array([100, 7]))
    q = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 64))
    with pytest.raises(ValueError, match="q must be floating point, got int32"):
        decode_attention(q.astype(jnp.int32), cache)
    for bad in (0.5, True, "0"):
        with pytest.raises(ValueError, match=f"layer={bad!r} must be an int in \\[0, 1\\)"):
            decode_attention(q, cache, layer=bad)
    np.testing.assert_array_equal(np.asarray(decode_attention(q, cache, layer=np.int64(0))),
                                  np.asarray(decode_attention(q, cache, layer=0)))
    layer = cache.layer(0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 512\], got \[4294967301, 5\]"):
        decode_attention_layer(q, layer, np.array([2**32 + 5, 5], np.int64), cfg)


def test_numpy_integer_sizes_accepted_bools_rejected():
    cfg = CacheConfig.innerq(capacity=np.int64(512), sink=np.int32(4), bits=np.int8(2))
    assert cfg == CacheConfig.innerq(capacity=512)
    assert type(cfg.capacity) is int and type(cfg.sink) is int and type(cfg.bits) is int
    cache = KVCache.create(cfg, np.int64(2), np.int64(1), np.int64(2), np.int64(64))
    assert (cache.num_layers, cache.batch, cache.num_kv_heads, cache.head_dim) == (2, 1, 2, 64)
    assert type(cache.head_dim) is int and type(cache.num_kv_heads) is int
    with pytest.raises(ValueError, match="batch=True must be a positive int"):
        KVCache.create(cfg, 1, True, 1, 64)
    with pytest.raises(ValueError, match=r"head_dim=64\.0 must be a positive int"):
        KVCache.create(cfg, 1, 1, 1, 64.0)


def test_create_matches_prefill_of_nothing():
    cfg = CacheConfig.innerq(capacity=512)
    k, v = _kv(5, (1, 2, 2, 8, 64))
    a = KVCache.create(cfg, 1, 2, 2, 64)
    b = KVCache.from_prefill(cfg, k, v, np.array([0, 0]))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
    assert len(a.layers) == 1 and isinstance(a.layers[0], QuantLayer)


def test_recommended_preset_and_cli_mapping():
    """The recommended preset costs exactly what paper-faithful InnerQ costs, and the
    CLI's presets keep their own defaults unless a flag overrides them."""
    import argparse

    from models.cli import _cache_config

    rec, faithful = CacheConfig.recommended(capacity=2048), CacheConfig.innerq(capacity=2048)
    assert (rec.kind, rec.rotation, rec.sink, rec.recent) == ("innerq", "keys_values", 36, 96)
    shapes = lambda c: jax.eval_shape(lambda: KVCache.create(c, 2, 1, 2, 64))
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    assert nbytes(shapes(rec)) == nbytes(shapes(faithful))
    ns = argparse.Namespace(cache="recommended", capacity=1024, bits=2, group_size=32,
                            sink=None, recent=None, rotation=None)
    assert _cache_config(ns) == CacheConfig.recommended(capacity=1024)
    ns.cache = "innerq"
    assert _cache_config(ns) == CacheConfig.innerq(capacity=1024)
    ns.sink, ns.recent = 8, 64
    assert _cache_config(ns) == CacheConfig.innerq(capacity=1024, sink=8, recent=64)
    ns.cache, ns.sink = "outerq", None
    assert _cache_config(ns) == CacheConfig.outerq(capacity=1024, recent=64)

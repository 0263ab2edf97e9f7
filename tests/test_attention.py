"""Reference decode attention against float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from innerq_jax import CacheConfig, KVCache, decode_attention

CONFIGS = {
    "innerq2": CacheConfig.innerq(capacity=512),
    "innerq4-G64": CacheConfig.innerq(bits=4, group_size=64, recent=64, capacity=512),
    "innerq-h2": CacheConfig.innerq_h(capacity=512),
    "innerq-h-keys": CacheConfig.innerq(rotation="keys", capacity=512),
    "innerq-asym-std": CacheConfig.innerq(hybrid="asymmetric", key_scale="std", capacity=512),
    "innerq-sym-fp16": CacheConfig.innerq(hybrid="symmetric", scale_dtype="float16", capacity=512),
    "innerq-no-norm": CacheConfig.innerq(key_norm="none", sink=0, recent=0, capacity=512),
    "outerq2": CacheConfig.outerq(capacity=512),
    "outerq2-sinks": CacheConfig.outerq(sink=4, capacity=512),
}

L, B, H, Hq, T, D = 1, 3, 2, 8, 400, 64
LENGTHS = np.array([400, 150, 3])


def _data(seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, B, H, T, D)) + 2.0 * rng.standard_normal(D)  # channel offsets
    k[..., 7] *= 6.0  # an outlier channel, as real keys have
    v = rng.standard_normal((L, B, H, T, D))
    q = rng.standard_normal((B, Hq, D))
    return (jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(q, jnp.float32))


def _build(cfg, seed=0, steps=20):
    """Prefill 380 tokens then append 20 more (so flushes happen during decode)."""
    k, v, q = _data(seed)
    pre = np.minimum(LENGTHS, T - steps)
    cache = KVCache.from_prefill(cfg, k[:, :, :, : T - steps], v[:, :, :, : T - steps], pre)
    kk, vv = np.asarray(k), np.asarray(v)
    for i in range(steps):
        idx = pre + i
        k_new = np.stack([kk[0, b, :, idx[b]] for b in range(B)])[None]
        v_new = np.stack([vv[0, b, :, idx[b]] for b in range(B)])[None]
        cache = cache.append(jnp.asarray(k_new), jnp.asarray(v_new))
    return cache, k, v, q


def _query_oracle(q, layer, b, h, cfg):
    """q' = sigma * (H q) / sqrt(D), float64, for the r query heads of kv head h."""
    r = Hq // H
    qh = np.asarray(q[b, h * r : (h + 1) * r], np.float64)
    if cfg.rotate_keys:
        qh = qh @ oracle.hadamard(D)
    return qh * np.asarray(layer.k_scale[b, h], np.float64) / np.sqrt(D)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_float64_attention_over_stored_cache(name):
    """The inner-grouped reference equals f64 attention over the decoded stored cache."""
    cfg = CONFIGS[name]
    cache, k, v, q = _build(cfg)
    out = np.asarray(decode_attention(q, cache, backend="reference"), np.float64)
    layer = cache.layer(0)
    r = Hq // H
    for b in range(B):
        n = int(cache.lengths[b])
        for h in range(H):
            ks, vs, _ = oracle.materialize(layer, b, h, n, cfg)
            o = oracle.softmax_attention(_query_oracle(q, layer, b, h, cfg), ks, vs, np.ones(n, bool))
            if cfg.rotate_values:
                o = o @ oracle.hadamard(D)
            got = out[b, h * r : (h + 1) * r]
            np.testing.assert_allclose(got, o, rtol=2e-4, atol=2e-5 * np.abs(o).max())


@pytest.mark.parametrize("name", ["innerq2", "innerq-h2", "outerq2", "innerq4-G64"])
def test_error_vs_exact_kv_within_predicted_bound(name):
    """Against exact K/V: the error stays inside the bound the stored scales predict.

    Per token the stored key deviates by at most delta_t,d (s/2 in quantized
    groups, a bf16 half-ulp in the windows), so each score moves by at most
    e = max_t sum_d |q'_d| delta_t,d; softmax then moves p by at most
    exp(2e) - 1 in L1, and the output by (exp(2e) - 1) max_t |v_t| + max_t |dv_t|
    (L2, rotation-invariant).
    """
    cfg = CONFIGS[name]
    cache, k, v, q = _build(cfg, seed=1)
    out = np.asarray(decode_attention(q, cache, backend="reference"), np.float64)
    layer = cache.layer(0)
    r = Hq // H
    G = cfg.group_size
    checked = 0
    for b in range(B):
        n = int(cache.lengths[b])
        sizes = [int(x[b]) for x in cache.region_sizes()[:3]]
        for h in range(H):
            _, _, lab = oracle.materialize(layer, b, h, n, cfg)
            kx = np.asarray(k[0, b, h, :n], np.float64)
            vx = np.asarray(v[0, b, h, :n], np.float64)
            exact = oracle.softmax_attention(
                np.asarray(q[b, h * r : (h + 1) * r], np.float64) / np.sqrt(D), kx, vx,
                np.ones(n, bool))
            # per-element error bounds in the stored space
            mu = np.asarray(layer.k_centre[b, h], np.float64)
            sig = np.asarray(layer.k_scale[b, h], np.float64)
            kst = kx - mu
            vst = vx
            if cfg.rotate_keys:
                kst = kst @ oracle.hadamard(D)
            if cfg.rotate_values:
                vst = vst @ oracle.hadamard(D)
            kst = kst / sig
            dk = np.abs(kst) * 2.0**-8
            dv = np.abs(vst) * 2.0**-8
            nq = sizes[1]
            quant = slice(sizes[0], sizes[0] + nq)
            for qt, d in ((layer.k, dk), (layer.v, dv)):
                s = np.asarray(qt.scale[b, h], np.float64)
                s = np.repeat(s, G, axis=-1 if qt.grouping == "d" else -2)[:nq]
                # quantized from the bf16 window copy: s/2 plus that copy's rounding
                d[quant] = s / 2 + np.abs((kst if d is dk else vst)[quant]) * 2.0**-8
            qp = _query_oracle(q, layer, b, h, cfg)
            e = (np.abs(qp) @ dk.T).max()
            bound = (np.exp(2 * e) - 1) * np.linalg.norm(vst, axis=1).max() + np.linalg.norm(
                dv, axis=1).max()
            err = np.linalg.norm(out[b, h * r : (h + 1) * r] - exact, axis=1)
            assert np.all(err <= bound * 1.001 + 1e-6), (err, bound)
            assert np.isfinite(bound)
            checked += (lab == "quant").any()
    assert checked, "the bound must be exercised on quantized tokens"


@pytest.mark.parametrize("rotation", ["none", "keys_values"])
def test_key_normalization_is_invisible_on_unquantized_keys(rotation):
    """All tokens in bf16 windows: attention with and without normalization agree."""
    k, v, q = _data(2)
    n = 100  # sink 4 + recent window of up to R + G - 1 = 255: nothing quantized
    base = dict(recent=224, group_size=32, capacity=512)
    outs = []
    for norm in ("centre_scale", "scale", "none"):
        cfg = CacheConfig.innerq(key_norm=norm, rotation=rotation, **base)
        cache = KVCache.from_prefill(cfg, k[:, :, :, :n], v[:, :, :, :n], np.array([n, 60, 3]))
        assert int(cache.region_sizes().quantized.max()) == 0
        outs.append(np.asarray(decode_attention(q, cache, backend="reference"), np.float64))
    exact = []
    for b, m in enumerate([n, 60, 3]):
        qh = np.asarray(q[b], np.float64).reshape(H, Hq // H, D) / np.sqrt(D)
        exact.append(np.concatenate([oracle.softmax_attention(
            qh[h], np.asarray(k[0, b, h, :m], np.float64), np.asarray(v[0, b, h, :m], np.float64),
            np.ones(m, bool)) for h in range(H)]))
    exact = np.stack(exact)
    for o in outs:  # only bf16 storage rounding separates them
        np.testing.assert_allclose(o, exact, rtol=0, atol=3e-2 * np.abs(exact).max())
    np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=3e-2 * np.abs(exact).max())


def test_sequences_are_independent():
    """Each sequence of a ragged batch attends exactly as it would alone."""
    cfg = CONFIGS["innerq2"]
    cache, k, v, q = _build(cfg, seed=3)
    out = np.asarray(decode_attention(q, cache, backend="reference"))
    for b in range(B):
        solo = KVCache.from_prefill(cfg, k[:, b : b + 1, :, : T - 20], v[:, b : b + 1, :, : T - 20],
                                    np.minimum(LENGTHS[b : b + 1], T - 20))
        kk, vv = np.asarray(k), np.asarray(v)
        for i in range(20):
            idx = min(LENGTHS[b], T - 20) + i
            solo = solo.append(jnp.asarray(kk[:, b : b + 1, :, idx]), jnp.asarray(vv[:, b : b + 1, :, idx]))
        got = np.asarray(decode_attention(q[b : b + 1], solo, backend="reference"))
        np.testing.assert_allclose(out[b : b + 1], got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [CONFIGS["innerq2"], CONFIGS["outerq2"],
                                 CacheConfig.int8(capacity=512), CacheConfig.bf16(capacity=512)],
                         ids=lambda c: c.short_name())
def test_non_finite_kv_stays_in_its_sequence(cfg):
    """NaN / Inf make their own sequence's output non-finite (never silently finite, on
    any backend) and leave the other sequences bit-identical. Sequence 0 holds 400
    tokens, so tokens 50 and 200 sit in the quantized region of the quantized caches."""
    k, v, q = _data(4)
    k = k.at[0, 0, 0, 50, 3].set(jnp.nan)
    v = v.at[0, 0, 1, 200, 9].set(jnp.inf)
    cache = KVCache.from_prefill(cfg, k, v, LENGTHS)
    if cfg.quantized:
        assert int(cache.region_sizes().quantized[0]) > 200
    out = np.asarray(decode_attention(q, cache, backend="reference"))
    assert np.all(np.isfinite(out[1:]))
    clean = KVCache.from_prefill(cfg, k.at[:, 0].set(0.5), v.at[:, 0].set(0.5), LENGTHS)
    ref = np.asarray(decode_attention(q, clean, backend="reference"))
    np.testing.assert_array_equal(out[1:], ref[1:])
    o = out[0].reshape(H, Hq // H, D)
    assert not np.isfinite(o[0]).any()  # every query of kv head 0 scores the NaN key
    assert not np.isfinite(o[1, :, 9]).any()  # kv head 1 sums the Inf value of channel 9


def test_empty_sequence_gives_zeros_not_nan():
    cfg = CONFIGS["innerq2"]
    k, v, q = _data(5)
    cache = KVCache.from_prefill(cfg, k, v, np.array([400, 0, 10]))
    out = np.asarray(decode_attention(q, cache, backend="reference"))
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_dense_baselines(kind):
    cfg = CacheConfig.bf16(capacity=512) if kind == "bf16" else CacheConfig.int8(capacity=512)
    cache, k, v, q = _build(cfg, seed=6)
    out = np.asarray(decode_attention(q, cache, backend="reference"), np.float64)
    r = Hq // H
    for b in range(B):
        n = int(cache.lengths[b])
        for h in range(H):
            exact = oracle.softmax_attention(
                np.asarray(q[b, h * r : (h + 1) * r], np.float64) / np.sqrt(D),
                np.asarray(k[0, b, h, :n], np.float64), np.asarray(v[0, b, h, :n], np.float64),
                np.ones(n, bool))
            # bf16 rounding; int8 steps of max|k_t|/127, large here (a 6x outlier channel)
            tol = 2e-2 if kind == "bf16" else 8e-2
            np.testing.assert_allclose(out[b, h * r : (h + 1) * r], exact, rtol=0,
                                       atol=tol * np.abs(exact).max())
    if kind == "int8":
        assert all(lay.k.dtype == jnp.int8 for lay in cache.layers)


def test_attention_jits_with_static_config():
    cfg = CONFIGS["innerq-h2"]
    cache, k, v, q = _build(cfg, seed=7, steps=2)
    eager = decode_attention(q, cache, backend="reference")
    jitted = jax.jit(lambda q, c: decode_attention(q, c, backend="reference"))(q, cache)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,backend", [("int8", "pallas"), ("int8", "tpu"),
                                          ("bf16", "tpu-interpret")])
def test_accelerator_baseline_paths_match_reference(kind, backend):
    """The dense baselines' accelerator paths (bf16 operands, f32 accumulation) against
    the f32 blockwise reference on the same cache: only the bf16 rounding of q and p
    differs (relative L2 below 1e-2)."""
    rng = np.random.default_rng(11)
    cfg = getattr(CacheConfig, kind)(capacity=1024)
    k = rng.standard_normal((1, 3, 2, 900, 64)).astype(np.float32)
    v = rng.standard_normal((1, 3, 2, 900, 64)).astype(np.float32)
    cache = KVCache.from_prefill(cfg, jnp.asarray(k), jnp.asarray(v), np.array([900, 513, 7]))
    q = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.float32)
    ref = decode_attention(q, cache, 0, backend="reference")
    out = decode_attention(q, cache, 0, backend=backend)
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2


def test_kernel_options_the_chosen_kernel_does_not_take_are_named():
    """A tunable of another kernel (here the Mosaic GPU op's) passed to a call the dispatch
    runs on the fused Triton kernel: a ValueError naming the chosen kernel and what it
    takes, not a TypeError from deep inside; the kernel's own tunables pass through."""
    cfg = CacheConfig.innerq(capacity=512)
    rng = np.random.default_rng(12)
    k = jnp.asarray(rng.standard_normal((1, 1, 2, 300, 64)), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, k * 0.5 + 1.0, jnp.array([300]))
    q = jnp.asarray(rng.standard_normal((1, 8, 64)), jnp.float32)
    for bad in ({"finish": "kernel"}, {"wide_copies": True}, {"num_warp": 4}):
        with pytest.raises(ValueError, match=rf"{next(iter(bad))}.*fused Triton.*num_splits"):
            decode_attention(q, cache, backend="interpret", **bad)
    out = decode_attention(q, cache, backend="interpret", num_splits=2)
    ref = decode_attention(q, cache, backend="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-3, atol=2e-3)

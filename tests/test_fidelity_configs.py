"""The issue-14 cache families: fp8 scales, key groups of 16 along D, mixed key /
value groupings, randomized Hadamard signs; their validation, byte counts, dispatch
and the ``search3`` set's byte budget.

Oracles are float64 numpy (``tests/oracle.py`` and ``ml_dtypes`` for fp8); nothing
here reuses the package's quantization math to check itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from innerq_jax import CacheConfig, KVCache, decode_attention
from innerq_jax.cache import rotation_signs
from innerq_jax.quant import quantize_groups
from models.evaluate import (
    FINALISTS3,
    LONG_CAPACITY,
    SEARCH3_MAX_BYTES,
    bytes_per_element,
    named_set,
)
import oracle

FP8 = "float8_e4m3fn"
FP8_NP = ml_dtypes.float8_e4m3fn
# every finite fp8 value, ascending (the oracle for rounding direction)
_ALL = np.arange(256, dtype=np.uint8).view(FP8_NP).astype(np.float64)
FP8_VALUES = np.unique(_ALL[np.isfinite(_ALL)])


def _groups(seed, n=600, G=16):
    """Random non-zero groups over many magnitudes (1e-4 .. 20), some offset."""
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(-4, 1.3, (n, 1))
    x = rng.standard_normal((n, G)) * mag + rng.standard_normal((n, 1)) * mag * 2
    return x.astype(np.float32)


# ------------------------------------------------------------------ fp8 quant
@pytest.mark.parametrize("policy", ["asymmetric", "symmetric", "hybrid"])
@pytest.mark.parametrize("bits", [2, 4])
def test_fp8_error_within_half_the_stored_scale(policy, bits):
    x = _groups(bits)
    q = quantize_groups(jnp.asarray(x), bits, policy, jnp.float8_e4m3fn)
    assert q.scale.dtype == jnp.float8_e4m3fn and q.zero.dtype == jnp.float8_e4m3fn
    s = np.asarray(q.scale.astype(jnp.float32), np.float64)
    z = np.asarray(q.zero.astype(jnp.float32), np.float64)
    c = np.asarray(q.codes, np.float64)
    assert np.all(np.isfinite(s)), "every group here fits fp8's range"
    assert c.max() <= 2**bits - 1
    xh = oracle.recon(c, s, z)
    err = np.abs(x.astype(np.float64) - xh)
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-9)), np.max(err / s[:, None])
    # the symmetric grid keeps an exact zero: z == -c0 * s exactly
    sym = np.asarray(q.symmetric)
    c0 = 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(z[sym], -c0 * s[sym])


def test_fp8_rounding_direction_is_the_next_fp8_value():
    """Asymmetric: z is the largest fp8 <= min, s the smallest fp8 >= (max - z)/qmax."""
    x = _groups(7, n=400)
    q = quantize_groups(jnp.asarray(x), 2, "asymmetric", jnp.float8_e4m3fn)
    s = np.asarray(q.scale.astype(jnp.float32), np.float64)
    z = np.asarray(q.zero.astype(jnp.float32), np.float64)
    x64 = x.astype(np.float64)
    lo, hi = x64.min(-1), x64.max(-1)
    want_z = FP8_VALUES[np.searchsorted(FP8_VALUES, lo, side="right") - 1]
    np.testing.assert_array_equal(z, want_z)
    need = (hi - z) / 3
    want_s = FP8_VALUES[np.searchsorted(FP8_VALUES, need, side="left")]
    np.testing.assert_array_equal(s, want_s)
    # the grid covers the group: z <= min and z + 3 s >= max
    assert np.all(z <= lo) and np.all(z + 3 * s >= hi)


def test_fp8_symmetric_scale_keeps_four_significant_bits_and_covers():
    x = _groups(8, n=400)
    for bits, c0 in ((2, 1), (4, 7)):
        q = quantize_groups(jnp.asarray(x), bits, "symmetric", jnp.float8_e4m3fn)
        s = np.asarray(q.scale.astype(jnp.float32), np.float64)
        amax = np.abs(x.astype(np.float64)).max(-1)
        assert np.all(c0 * s >= amax)  # rounded up: no value past the grid
        assert np.all(np.isin(s, FP8_VALUES)) and np.all(np.isin(c0 * s, FP8_VALUES))


def test_fp8_tiny_groups_round_up_not_to_zero():
    """Below fp8's smallest subnormal (2^-9) a scale still rounds up and covers."""
    x = np.array([[1e-6, -3e-6, 2e-6, 5e-7] * 4, [1e-4, 2e-4, -1e-4, 0.0] * 4], np.float32)
    for policy in ("asymmetric", "symmetric", "hybrid"):
        q = quantize_groups(jnp.asarray(x), 2, policy, jnp.float8_e4m3fn)
        s = np.asarray(q.scale.astype(jnp.float32), np.float64)
        z = np.asarray(q.zero.astype(jnp.float32), np.float64)
        assert np.all(s > 0)
        xh = oracle.recon(np.asarray(q.codes, np.float64), s, z)
        assert np.all(np.abs(x - xh) <= s[:, None] / 2 * (1 + 1e-9))


def test_fp8_overflow_gives_nan_scale_never_saturates():
    """A range fp8 cannot hold (scale or offset past 448) reconstructs as NaN, like a
    non-finite group; a group that fits in one mode takes that mode under hybrid."""
    G = 16
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, G)
    rows = [
        base * 2000.0,  # asymmetric scale 2000/3 > 448; symmetric max 2000 > 448
        -600.0 + base,  # offset below -448
        400.0 + base * 60.0,  # fits asymmetrically (z 384, s ~25); symmetric 460 > 448
        base,  # fits everywhere
    ]
    x = jnp.asarray(np.stack(rows), jnp.float32)
    for policy in ("asymmetric", "symmetric", "hybrid"):
        q = quantize_groups(x, 2, policy, jnp.float8_e4m3fn)
        s = np.asarray(q.scale.astype(jnp.float32))
        assert np.isnan(s[0]) and np.isnan(s[1]), policy
        assert np.isfinite(s[3]), policy
        assert np.isfinite(s[2]) == (policy != "symmetric"), policy
    qh = quantize_groups(x, 2, "hybrid", jnp.float8_e4m3fn)
    assert not bool(qh.symmetric[2])
    # the bf16 path is unchanged: no overflow there
    assert np.all(np.isfinite(np.asarray(quantize_groups(x, 2, "hybrid").scale, np.float32)))


# ------------------------------------------------------------------- bytes
def _model():
    return SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=64)


def test_fp8_scales_are_one_byte_and_k16_fp8_costs_what_g32_bf16_does():
    k16 = CacheConfig.innerq_h(key_group_size=16, key_scale_dtype=FP8, capacity=1024)
    base = CacheConfig.innerq_h(capacity=1024)
    c16 = KVCache.create(k16, 1, 1, 2, 64)
    c32 = KVCache.create(base, 1, 1, 2, 64)
    lk16, lk32 = c16.layer(0).k, c32.layer(0).k
    assert lk16.scale.dtype == jnp.float8_e4m3fn and lk16.scale.dtype.itemsize == 1
    assert lk16.scale.shape[-1] == 64 // 16 and lk16.group_size == 16
    assert c16.layer(0).v.scale.dtype == jnp.bfloat16  # values keep scale_dtype
    assert lk16.scale.nbytes + lk16.zero.nbytes == lk32.scale.nbytes + lk32.zero.nbytes
    assert lk16.codes.nbytes == lk32.codes.nbytes
    # the mask holds one bit per group: twice the key groups, twice the mask bits
    assert lk16.mask.nbytes == 2 * lk32.mask.nbytes
    m = _model()
    diff = bytes_per_element(m, k16, 32768) - bytes_per_element(m, base, 32768)
    assert 0 < diff <= 1 / 512 + 1e-6  # only the extra mask bit per 32 key elements
    g16 = CacheConfig.innerq_h(group_size=16, scale_dtype=FP8)
    assert abs(bytes_per_element(m, g16, 32768) - bytes_per_element(m, k16, 32768)) < 2e-3


def test_search3_candidates_within_budget():
    rows = named_set("search3")
    labels = [r[0] for r in rows]
    assert labels[:3] == ["bf16", "outerq2+sinks", "recommended"]
    assert rows[1][1] == CacheConfig.outerq(sink=4)
    assert rows[2][1] == CacheConfig.recommended()
    assert len(set(labels)) == len(labels) and 12 <= len(rows) - 3 <= 18
    m = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
    for label, cfg in rows[1:]:
        b = bytes_per_element(m, cfg, LONG_CAPACITY)
        assert b <= SEARCH3_MAX_BYTES, (label, b)
        assert cfg.sink + cfg.recent <= 132, label
    fin = named_set("finalists3")
    assert [r[0] for r in fin][:3] == ["bf16", "outerq2+sinks", "recommended"]
    assert set(FINALISTS3) <= set(labels)


# ------------------------------------------------------------- caches end to end
L, B, H, Hq, T, D = 1, 2, 2, 4, 300, 64
LENGTHS = np.array([300, 170])
STEPS = 40  # crosses at least one flush of 32 tokens in each sequence

CACHES = {
    "mixed Kt Vt": CacheConfig.innerq(k_axis="t", capacity=512),
    "mixed Kd Vd": CacheConfig.innerq_h(v_axis="d", capacity=512),
    "K16 fp8": CacheConfig.innerq_h(key_group_size=16, key_scale_dtype=FP8, capacity=512),
    "G16 fp8 all": CacheConfig.innerq(group_size=16, recent=64, scale_dtype=FP8, capacity=512),
    "signs keys+values": CacheConfig.innerq_h(rotation_signs=True, sink=36, recent=96,
                                              capacity=512),
    "signs keys K16 fp8": CacheConfig.innerq_h(rotation="keys", rotation_signs=True,
                                               rotation_seed=5, key_group_size=16,
                                               key_scale_dtype=FP8, capacity=512),
}


def _data(seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, B, H, T + STEPS, D)) + 2.0 * rng.standard_normal(D)
    k[..., 5] *= 6.0  # an outlier channel
    v = rng.standard_normal((L, B, H, T + STEPS, D))
    q = rng.standard_normal((B, Hq, D))
    return k.astype(np.float32), v.astype(np.float32), q.astype(np.float32)


def _build(cfg):
    k, v, q = _data(0)
    cache = KVCache.from_prefill(cfg, jnp.asarray(k[:, :, :, :T]), jnp.asarray(v[:, :, :, :T]),
                                 LENGTHS)
    append = jax.jit(lambda c, kn, vn: c.append(kn, vn))
    for i in range(STEPS):
        idx = LENGTHS + i
        kn = np.stack([k[:, b, :, idx[b]] for b in range(B)], axis=1)
        vn = np.stack([v[:, b, :, idx[b]] for b in range(B)], axis=1)
        cache = append(cache, jnp.asarray(kn), jnp.asarray(vn))
    return cache, k, v, q


# layouts whose kernel tests also run with -m slow stay out of the default suite (CI time)
SLOW_CACHES = {"mixed Kd Vd", "G16 fp8 all"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CACHES
                                  else n for n in CACHES])
def test_reference_equals_dense_attention_over_stored_cache(name):
    """Prefill + 40 appends (flushes included): the reference's inner-grouped attention
    equals float64 softmax attention over the decoded cache, signs and rotation undone
    by an independent oracle."""
    cfg = CACHES[name]
    cache, k, v, q = _build(cfg)
    assert np.all(np.asarray(cache.region_sizes().quantized) >= 64)
    for i in range(L):
        lay = cache.layer(i)
        assert lay.k.grouping == cfg.k_grouping and lay.v.grouping == cfg.v_grouping
        assert lay.k.group_size == cfg.k_group
        out = np.asarray(decode_attention(jnp.asarray(q), cache, i, backend="reference"),
                         np.float64)
        r = Hq // H
        Hd = oracle.hadamard(D)
        for b in range(B):
            n = int(cache.lengths[b])
            for h in range(H):
                ks, vs, _ = oracle.materialize(lay, b, h, n, cfg)
                sg = (np.asarray(lay.rot_signs[b, h], np.float64) if cfg.rotation_signs
                      else np.ones(D))
                qh = q[b, h * r:(h + 1) * r].astype(np.float64)
                if cfg.rotate_keys:
                    qh = (qh * sg) @ Hd
                qh = qh * np.asarray(lay.k_scale[b, h], np.float64) / np.sqrt(D)
                o = oracle.softmax_attention(qh, ks, vs, np.ones(n, bool))
                if cfg.rotate_values:
                    o = (o @ Hd) * sg
                np.testing.assert_allclose(out[b, h * r:(h + 1) * r], o, rtol=2e-4,
                                           atol=2e-5 * np.abs(o).max())


def test_signs_are_undone_against_exact_kv():
    """With windows that keep every token in bf16 (nothing quantized), attention through
    the signed rotation (keys, query, values and output) equals exact attention over the
    raw K/V up to bf16 rounding; a sign left anywhere would give errors of order |v|."""
    cfg = CacheConfig.innerq_h(rotation_signs=True, rotation_seed=9, sink=36, recent=320,
                               capacity=512)
    cache, k, v, q = _build(cfg)
    assert np.all(np.asarray(cache.region_sizes().quantized) == 0)
    out = np.asarray(decode_attention(jnp.asarray(q), cache, 0, backend="reference"))
    r = Hq // H
    for b in range(B):
        n = int(cache.lengths[b])
        for h in range(H):
            o = oracle.softmax_attention(q[b, h * r:(h + 1) * r].astype(np.float64) / np.sqrt(D),
                                         k[0, b, h, :n].astype(np.float64),
                                         v[0, b, h, :n].astype(np.float64), np.ones(n, bool))
            np.testing.assert_allclose(out[b, h * r:(h + 1) * r], o, atol=0.05 * np.abs(o).max())


def test_signs_deterministic_and_distinct_across_layers_and_heads():
    cfg = CacheConfig.innerq_h(rotation_signs=True, rotation_seed=3)
    a = np.asarray(rotation_signs(cfg, 4, 2, 3, 64))
    b = np.asarray(rotation_signs(cfg, 4, 2, 3, 64))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int8 and set(np.unique(a)) == {-1, 1}
    np.testing.assert_array_equal(a[0], a[1])  # the same for every sequence
    assert not np.array_equal(a[0, 0], a[0, 1]) and not np.array_equal(a[0, 1], a[0, 2])
    other = np.asarray(rotation_signs(cfg, 5, 2, 3, 64))
    assert not np.array_equal(a[0, 0], other[0, 0])
    seed = np.asarray(rotation_signs(cfg.replace(rotation_seed=4), 4, 2, 3, 64))
    assert not np.array_equal(a, seed)
    assert rotation_signs(CacheConfig.innerq_h(), 0, 1, 1, 64) is None
    # the cache's leaves are those signs, layer by layer (create and prefill alike)
    cache = KVCache.create(cfg.replace(capacity=256), 3, 2, 3, 64)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(cache.layer(i).rot_signs),
                                      np.asarray(rotation_signs(cfg, i, 2, 3, 64)))
    k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 3, 40, 64)), jnp.float32)
    pre = KVCache.from_prefill(cfg.replace(capacity=256), k, k, np.array([40, 20]))
    np.testing.assert_array_equal(np.asarray(pre.layer(1).rot_signs),
                                  np.asarray(rotation_signs(cfg, 1, 2, 3, 64)))
    assert KVCache.create(CacheConfig.innerq_h(capacity=256), 1, 1, 1, 64).layer(0).rot_signs \
        is None


# ------------------------------------------------------------ validation, dispatch
@pytest.mark.parametrize("kwargs, match", [
    (dict(k_axis="x"), "k_axis"),
    (dict(v_axis="T"), "v_axis"),
    (dict(key_group_size=8), "key_group_size"),
    (dict(key_group_size=16.0), "key_group_size"),
    (dict(kind="outerq", key_group_size=16), "keys group along T"),
    (dict(k_axis="t", key_group_size=16), "keys group along T"),
    (dict(scale_dtype="float8_e5m2"), "scale_dtype"),
    (dict(key_scale_dtype="int8"), "key_scale_dtype"),
    (dict(rotation_signs=True), "needs a rotation"),
    (dict(rotation_signs=1, rotation="keys"), "rotation_signs"),
    (dict(rotation_seed=-1), "rotation_seed"),
    (dict(kind="bf16", sink=0, recent=0, key_norm="none", k_axis="t"), "quantized cache"),
])
def test_invalid_new_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_key_group_must_divide_head_dim():
    with pytest.raises(ValueError, match="key_group_size=64 must divide head_dim=32"):
        KVCache.create(CacheConfig(group_size=16, recent=128, key_group_size=64), 1, 1, 1, 32)


def test_defaults_unchanged_and_short_names():
    base = CacheConfig()
    assert base.k_grouping == "d" and base.v_grouping == "t" and base.kernel_unsupported == ()
    assert CacheConfig.outerq().k_grouping == "t" and CacheConfig.outerq().v_grouping == "d"
    assert base.short_name() == "innerq2-G32-S4-R128"
    cfg = CacheConfig.innerq_h(v_axis="d", key_group_size=16, key_scale_dtype=FP8,
                               rotation_signs=True, rotation_seed=2)
    assert cfg.short_name() == "innerq-h2-G32-S4-R128-KdVd-KG16-Kfp8scale-signs2"
    assert CacheConfig(scale_dtype=FP8).short_name() == "innerq2-G32-S4-R128-fp8scale"


def test_dispatch_runs_layouts_where_a_kernel_reads_them():
    """The fused (Triton) kernel reads key groups of 16 with fp8 scales; the TPU kernel
    does not (an explicit request raises), nor does any kernel read a key group of its
    own with keys and values both along D; ``auto`` on the CPU is the reference."""
    rng = np.random.default_rng(1)
    cfg = CacheConfig.innerq(key_group_size=16, key_scale_dtype=FP8, capacity=256)
    k = jnp.asarray(rng.standard_normal((1, 1, 2, 100, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 1, 2, 100, 64)), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, v, np.array([100]))
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.float32)
    ref = np.asarray(decode_attention(q, cache, backend="reference"), np.float64)
    np.testing.assert_array_equal(np.asarray(decode_attention(q, cache)), ref)
    out = np.asarray(decode_attention(q, cache, backend="interpret"), np.float64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
    for backend in ("tpu", "tpu-interpret"):
        with pytest.raises(ValueError, match="key_group_size=16"):
            decode_attention(q, cache, backend=backend)
    dd = CacheConfig.innerq(v_axis="d", key_group_size=16, capacity=256)
    cache_dd = KVCache.from_prefill(dd, k, v, np.array([100]))
    for backend in ("pallas", "interpret"):
        with pytest.raises(ValueError, match="key_group_size=16 with v_axis='d'"):
            decode_attention(q, cache_dd, backend=backend)

"""Group quantization and packing against the float64 numpy oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from innerq_jax.config import CacheConfig
from innerq_jax.layout import (
    dequantize_tensor,
    quantize_tokens,
    symmetric_flags,
    unpack_tensor_codes,
)
from innerq_jax.quant import (
    dequantize_groups,
    pack_codes,
    quantize_groups,
    unpack_codes,
)


def _groups(seed, shape, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if outliers:  # a few heavy entries, as real keys have
        x += 8 * (rng.random(shape) < 0.02) * rng.standard_normal(shape)
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_matches_documented_bit_layout(bits, axis):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(32, 64, 48)).astype(np.uint8)
    words = pack_codes(jnp.asarray(codes), bits, axis=axis)
    np.testing.assert_array_equal(oracle.unpack_words(np.asarray(words), bits, axis), codes)
    np.testing.assert_array_equal(np.asarray(unpack_codes(words, bits, axis=axis)), codes)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("G", [16, 32, 64])
def test_asymmetric_matches_oracle_and_error_bound(bits, G):
    x = _groups(G + bits, (64, G))
    q = quantize_groups(jnp.asarray(x), bits, "asymmetric")
    c, s, z = oracle.quantize_asym(x.astype(np.float64), bits)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), s)
    np.testing.assert_array_equal(np.asarray(q.zero, np.float64), z)
    # codes may differ only where x sits within float32 rounding of a half-step
    assert np.mean(np.asarray(q.codes) == c) > 0.999
    xhat = np.asarray(dequantize_groups(q.codes, q.scale, q.zero), np.float64)
    err = np.abs(xhat - x)
    assert np.all(err <= s[:, None] / 2 * (1 + 1e-5) + 1e-6), err.max()
    assert not np.asarray(q.symmetric).any()


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_grid_has_exact_zero(bits):
    x = _groups(3, (64, 32))
    x[:, 5] = 0.0
    q = quantize_groups(jnp.asarray(x), bits, "symmetric")
    c, s, z = oracle.quantize_sym(x.astype(np.float64), bits)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), s)
    xhat = np.asarray(dequantize_groups(q.codes, q.scale, q.zero), np.float64)
    np.testing.assert_array_equal(np.asarray(q.zero, np.float64), z)
    assert np.all(xhat[:, 5] == 0.0)  # z = -c0 * s is stored exactly: the grid holds 0
    if bits == 2:  # the grid is {-s, 0, s}
        assert set(np.unique(np.asarray(q.codes))) <= {0, 1, 2}
    assert np.all(np.abs(xhat - x) <= s[:, None] / 2 * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_hybrid_picks_lower_error_mode(bits):
    x = _groups(7, (512, 32))
    # make some groups symmetric-friendly (balanced around 0) and some skewed
    x[:128] = np.abs(x[:128]) + 3.0
    q = quantize_groups(jnp.asarray(x), bits, "hybrid")
    x64 = x.astype(np.float64)
    ea = ((oracle.recon(*oracle.quantize_asym(x64, bits)) - x64) ** 2).sum(-1)
    es = ((oracle.recon(*oracle.quantize_sym(x64, bits)) - x64) ** 2).sum(-1)
    decided = np.abs(ea - es) > 1e-4 * np.maximum(ea, es)  # skip float ties
    want_sym = es < ea
    got = np.asarray(q.symmetric)
    np.testing.assert_array_equal(got[decided], want_sym[decided])
    assert 0 < want_sym.mean() < 1, "the data must exercise both modes"
    xhat = np.asarray(dequantize_groups(q.codes, q.scale, q.zero), np.float64)
    chosen = ((xhat - x64) ** 2).sum(-1)
    assert np.all(chosen <= np.minimum(ea, es) * (1 + 1e-3) + 1e-9)


@pytest.mark.parametrize("policy", ["hybrid", "asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [2, 4])
def test_constant_groups_are_exact_and_finite(policy, bits):
    # bf16-representable constants, zeros, and a negative constant
    vals = np.array([0.0, 1.5, -2.25, 3.0, 1e-3], np.float32).astype(oracle.BF16)
    x = np.repeat(vals.astype(np.float32)[:, None], 32, axis=1)
    q = quantize_groups(jnp.asarray(x), bits, policy)
    xhat = np.asarray(dequantize_groups(q.codes, q.scale, q.zero))
    assert np.all(np.isfinite(xhat)) and np.all(np.isfinite(np.asarray(q.scale, np.float32)))
    if policy != "symmetric":
        np.testing.assert_array_equal(xhat, x)
    else:  # symmetric only: all-zero groups exact; others on the grid within s/2
        assert np.all(xhat[0] == 0)
        s = np.asarray(q.scale, np.float32)[:, None]
        assert np.all(np.abs(xhat - x) <= s / 2)


def test_non_finite_input_stays_in_its_group():
    x = _groups(11, (8, 32))
    x[3, 7] = np.nan
    x[5, 0] = np.inf
    q = quantize_groups(jnp.asarray(x), 2, "hybrid")
    xhat = np.asarray(dequantize_groups(q.codes, q.scale, q.zero))
    finite_rows = np.all(np.isfinite(xhat), axis=1)
    np.testing.assert_array_equal(finite_rows, [True, True, True, False, True, False, True, True])
    clean = quantize_groups(jnp.asarray(np.delete(x, [3, 5], 0)), 2, "hybrid")
    np.testing.assert_array_equal(np.delete(np.asarray(q.codes), [3, 5], 0), np.asarray(clean.codes))


@pytest.mark.parametrize("grouping,packing", [("d", "d"), ("t", "t"), ("t", "d"), ("d", "t")])
@pytest.mark.parametrize("bits,G", [(2, 32), (4, 64), (2, 16)])
def test_quantize_tokens_layout(grouping, packing, bits, G):
    """Packed storage decodes (by the documented layout) to the oracle's quantization.

    Grouping and packing are independent: ("t", "d") are OuterQ keys and
    ("d", "t") OuterQ values as the cache stores them.
    """
    cfg = CacheConfig.innerq(bits=bits, group_size=G, capacity=1024)
    T, D = 4 * G, 128
    x = _groups(bits * G, (2, T, D))
    qt = quantize_tokens(jnp.asarray(x), grouping, cfg, packing=packing)
    x64 = x.astype(np.float64)
    # groups as the spec defines them: along D per token, or along T per channel
    if grouping == "d":
        g = x64.reshape(2, T, D // G, G)
        assert qt.scale.shape == (2, T, D // G)
    else:
        g = np.swapaxes(x64.reshape(2, T // G, G, D), -1, -2)
        assert qt.scale.shape == (2, T // G, D)
    if packing == "d":
        assert qt.codes.shape == (2, T, D * bits // 32)
    else:
        assert qt.codes.shape == (2, T * bits // 32, D)
    assert qt.mask.shape == (2, T // G, D // 32)
    ea = ((oracle.recon(*oracle.quantize_asym(g, bits)) - g) ** 2).sum(-1)
    es = ((oracle.recon(*oracle.quantize_sym(g, bits)) - g) ** 2).sum(-1)
    got_sym = np.asarray(symmetric_flags(qt))
    decided = np.abs(ea - es) > 1e-4 * np.maximum(ea, es)
    np.testing.assert_array_equal(got_sym[decided], (es < ea)[decided])
    xhat = oracle.dequant_region(qt)
    np.testing.assert_allclose(xhat, np.asarray(dequantize_tensor(qt)), rtol=1e-6, atol=1e-6)
    s = np.asarray(qt.scale, np.float64)
    s_full = np.repeat(s, G, axis=-1 if grouping == "d" else -2)
    assert np.all(np.abs(xhat - x64) <= s_full / 2 * (1 + 1e-2) + 1e-6)
    codes = np.asarray(unpack_tensor_codes(qt))
    assert codes.shape == (2, T, D) and codes.max() <= 2**bits - 1


def test_bad_grouping_or_packing_is_rejected():
    cfg = CacheConfig.innerq(capacity=1024)
    x = jnp.asarray(_groups(3, (64, 128)))
    with pytest.raises(ValueError, match="packing='x'"):
        quantize_tokens(x, "d", cfg, packing="x")
    with pytest.raises(ValueError, match="grouping='q'"):
        quantize_tokens(x, "q", cfg)


def test_mask_and_codes_really_packed():
    cfg = CacheConfig.innerq(bits=2, group_size=32, capacity=1024)
    x = _groups(0, (1, 256, 128))
    qt = quantize_tokens(jnp.asarray(x), "d", cfg)
    n = x.size
    assert qt.codes.nbytes == n * 2 // 8  # 2 bits per value
    assert qt.scale.nbytes + qt.zero.nbytes == n // 32 * 2 * 2  # bf16 s and z per group
    assert qt.mask.nbytes == n // 32 // 8  # one bit per group


def test_jit_quantization_matches_eager():
    x = jnp.asarray(_groups(1, (16, 32)))
    eager = quantize_groups(x, 2, "hybrid")
    jitted = jax.jit(quantize_groups, static_argnums=(1, 2))(x, 2, "hybrid")
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("grouping", ["d", "t"])
@pytest.mark.parametrize("policy", ["hybrid", "asymmetric", "symmetric"])
def test_non_finite_group_stays_non_finite_at_any_size(grouping, policy):
    """A group holding NaN or Inf reconstructs as non-finite, every other group as if
    the bad values were absent. At these sizes XLA's CPU max reduction drops a NaN,
    so a wrong implementation gives a finite, wrong group here."""
    cfg = CacheConfig.innerq(hybrid=policy, capacity=1024)
    x = _groups(12, (2, 4, 64, 64))
    bad = {(1, 2, 40, 9): np.nan, (0, 3, 5, 33): np.inf, (1, 0, 63, 0): -np.inf}
    for idx, val in bad.items():
        x[idx] = val
    got = np.asarray(dequantize_tensor(quantize_tokens(jnp.asarray(x), grouping, cfg)))
    G = cfg.group_size
    expect_bad = np.zeros(x.shape, bool)
    for b, h, t, d in bad:
        if grouping == "d":  # the G channels of token t
            expect_bad[b, h, t, d // G * G:(d // G + 1) * G] = True
        else:  # the G tokens of channel d
            expect_bad[b, h, t // G * G:(t // G + 1) * G, d] = True
    np.testing.assert_array_equal(~np.isfinite(got), expect_bad)
    clean = x.copy()
    clean[expect_bad] = 0.5
    want = np.asarray(dequantize_tensor(quantize_tokens(jnp.asarray(clean), grouping, cfg)))
    np.testing.assert_array_equal(got[~expect_bad], want[~expect_bad])


def _bf16_neighbours(s: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The values one step below and above s (>= 0) on the grid of ``keep`` significant
    bits of float32, by float64 arithmetic on the exponent (no bit tricks)."""
    m, e = np.frexp(s)  # s = m 2^e, m in [0.5, 1)
    step = np.ldexp(1.0, e - keep)
    below = np.where(m == 0.5, step / 2, step)  # a power of two: the binade below is finer
    return s - below, s + step


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("policy", ["asymmetric", "symmetric"])
def test_bf16_scales_and_codes_are_exact(bits, policy):
    """bf16 scales are the smallest grid value whose grid reaches the group's top, and
    codes are round-half-even of the exact quotient, ties included: checked in float64
    on groups built to sit on exact half-steps (values on a 1/64 grid) and on random
    ones. Nothing here depends on how a backend divides."""
    rng = np.random.default_rng(bits * 7 + len(policy))
    # groups spanning [-A, A] on a 1/4 grid, A chosen so that the scale is 1/2: many
    # values sit exactly half-way between two codes
    half = (2**bits - 1) / 2 if policy == "asymmetric" else 2 ** (bits - 1) - 1
    A = int(half * 2)
    ties = rng.integers(-A, A + 1, (256, 32)) / 4.0
    ties[:, 0], ties[:, 1] = -A / 4, A / 4
    rand = _groups(5 + bits, (256, 32)) * np.exp(rng.uniform(-8, 8, (256, 1)))
    x = np.concatenate([ties, rand]).astype(np.float32).astype(oracle.BF16).astype(np.float32)
    q = quantize_groups(jnp.asarray(x), bits, policy)
    s = np.asarray(q.scale, np.float64)
    z = np.asarray(q.zero, np.float64)
    c = np.asarray(q.codes, np.float64)
    x64 = x.astype(np.float64)
    if policy == "asymmetric":
        mult, keep = 2**bits - 1, 8
        top = (x.max(-1) - np.asarray(q.zero, np.float32)).astype(np.float64)  # float32 difference
        np.testing.assert_array_equal(z, oracle.bf16_round_down(x64.min(-1)))
        t = x64 - z[:, None]
        qmax = mult
    else:
        c0 = 2 ** (bits - 1) - 1
        mult, keep = c0, 8 - c0.bit_length() + (1 if c0 & (c0 - 1) == 0 else 0)
        top = np.abs(x64).max(-1)
        np.testing.assert_array_equal(z, -c0 * s)
        t = x64
        c = c - c0
        qmax = None
    below, _ = _bf16_neighbours(s, keep)
    live = s > 0
    assert np.all(s * mult >= top) and np.all(below[live] * mult < top[live])
    assert np.all(top[~live] == 0)
    want = np.round(t / np.where(live, s, 1.0)[:, None])  # numpy rounds half to even
    want = np.where(live[:, None], want, 0.0)
    if qmax is not None:
        want = np.clip(want, 0, qmax)
    else:
        want = np.clip(want, -c0, c0)
    np.testing.assert_array_equal(c, want)
    halves = np.abs(t / np.where(live, s, 1.0)[:, None] % 1 - 0.5) == 0
    assert halves[:256].mean() > 0.1, "the data must hit exact half-steps"


@pytest.mark.parametrize("grouping", ["d", "t"])
def test_hybrid_agreement_finds_the_flipped_groups(grouping):
    """Hybrid against asymmetric quantization of the same values: the flips are exactly
    the groups where hybrid chose the symmetric mode, the rest decodes the same; one code
    changed in an agreeing group is caught."""
    from innerq_jax.layout import hybrid_agreement

    cfg = CacheConfig.innerq(capacity=1024)
    x = jnp.asarray(_groups(4, (2, 64, 128)))
    hyb = quantize_tokens(x, grouping, cfg)
    asym = quantize_tokens(x, grouping, cfg.replace(hybrid="asymmetric"))
    flips, same = hybrid_agreement(hyb, asym)
    sym = np.asarray(symmetric_flags(hyb))
    want = np.repeat(sym, 32, axis=-1 if grouping == "d" else -2)
    assert 0 < want.mean() < 1
    np.testing.assert_array_equal(np.asarray(flips), want)
    assert bool(same)
    # one word of codes changed where both chose the asymmetric mode
    t, d = np.argwhere(~want[0])[0]
    codes = np.asarray(asym.codes).copy()
    idx = (0, t, d * 2 // 32) if grouping == "d" else (0, t * 2 // 32, d)
    codes[idx] ^= np.uint32(3 << (2 * ((d if grouping == "d" else t) % 16)))
    bad = dataclasses.replace(asym, codes=jnp.asarray(codes))
    assert not bool(hybrid_agreement(hyb, bad)[1])

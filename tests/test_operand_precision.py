"""benchmarks/operand_precision.py: the hi + lo operand's error bound and the study's attention
emulation, each against an independent computation (the e4m3 unpack's bit trick is the
kernel's, tested in tests/test_mgpu_kernels.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import operand_precision as op  # noqa: E402


def test_hi_lo_pair_error_is_within_its_bound():
    """e4m3 hi + lo, scaled per slice by a power of two: |x - r| <= 2^-9 |x| (the lo term's
    half step) + 2^-10 of the slice's scale (e4m3's subnormal half step), over magnitudes
    from 1e-3 to 20 within and across slices; one e4m3 alone is far coarser."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128)) * np.exp(rng.uniform(-6, 3, (64, 1)))
    x *= np.exp(rng.uniform(-4, 0, x.shape))
    sc = op._pow2_scale(x, axis=1)
    np.testing.assert_array_equal(np.log2(sc), np.round(np.log2(sc)))  # powers of two
    assert np.all((np.abs(x) * sc).max(axis=1) < 256) and np.all((np.abs(x) * sc).max(axis=1) >= 128)
    r = op.rounded(x, "e4m3x2", axis=1)
    assert np.all(np.abs(r - x) <= 2.0**-9 * np.abs(x) + 2.0**-10 / sc)
    one = op.rounded(x, "e4m3", axis=1)
    assert np.median(np.abs(one - x) / np.abs(x)) > 8 * np.median(np.abs(r - x) / np.abs(x))
    with pytest.raises(ValueError, match="operand format"):
        op.rounded(x, "e5m2", axis=1)


def test_attention_emulation_equals_dequantized_softmax():
    """With no operand rounded, the study's inner-grouped math (each group's scale and zero
    applied once to the integer-code sums) equals the plain computation over the dequantized
    cache: softmax(q K^T) V."""
    rng = np.random.default_rng(2)
    T, D, r, G = 512, 64, 3, 32
    q, (kc, ks, kz, vc, vs, vz) = op.trial(rng, "outlier key channels", T, D, r, G)
    assert set(np.unique(kc)) <= {0.0, 1.0, 2.0, 3.0} and set(np.unique(vc)) <= {0.0, 1.0, 2.0, 3.0}
    k, v = kc * ks + kz, vc * vs + vz
    s = q @ k.T
    p = np.exp(s - s.max(1, keepdims=True))
    ref = (p / p.sum(1, keepdims=True)) @ v
    np.testing.assert_allclose(op.attention(q, kc, ks, kz, vc, vs, vz, G=G), ref, rtol=1e-10,
                               atol=1e-12)


def test_study_separates_the_formats():
    """A small run of the study: today's bf16 operands and the e4m3 hi + lo pair stay well
    inside the kernels' 1e-2 tolerance on Gaussian inputs, one e4m3 operand does not."""
    rows = op.run(trials=2, T=1024, D=128, r=4, G=32, log=lambda *_: None)
    got = {(row["regime"], row["variant"]): row["max"] for row in rows}
    assert got[("gaussian", "bf16 (today's kernels)")] < 5e-3
    assert got[("gaussian", "e4m3 hi+lo")] < 5e-3
    assert got[("gaussian", "e4m3")] > op.TOL


def test_plot_draws_every_regime_of_the_rows(tmp_path):
    """The plot takes its regimes from the rows (the real model's among them when present)
    and writes a PNG."""
    rows = op.run(trials=1, T=512, D=64, r=2, G=32, log=lambda *_: None)
    rows += [dict(row, regime="another") for row in rows if row["regime"] == "gaussian"]
    path = tmp_path / "p.png"
    assert op.plot(rows, str(path)) == [*op.REGIMES, "another"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_rejects_tokens_the_blocks_do_not_divide():
    """A token count the probability blocks (or groups) do not divide is refused with the
    sizes named, not reshaped into garbage."""
    rng = np.random.default_rng(3)
    q, cache = op.trial(rng, "gaussian", 256, 64, 2, 32)
    with pytest.raises(ValueError, match="256 tokens of 64 channels.*200 tokens"):
        op.attention(q, *cache, G=32, block=200)

"""The GEMV probe kernel (pallas_kernels/gemv.py) in interpret mode against a float64
reference, its checks, and its Triton lowering for an abstract H200."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemv import gemv

# SmolLM2-135M's five projection shapes at one sequence: qkv, o, gate / up, down
SHAPES = [(576, 960), (576, 576), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gemv_matches_float64(K, N, dtype):
    rng = np.random.default_rng(K + N)
    x = jnp.asarray(rng.standard_normal(K), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    got = gemv(x, w, interpret=True)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert got.shape == (N,) and got.dtype == dtype
    # float32 accumulation; the output rounded once to its dtype
    tol = 2.0 ** -8 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               atol=tol * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the compiled kernel")
@pytest.mark.parametrize("K,N", SHAPES)
def test_gemv_compiled_matches_float64(K, N):
    rng = np.random.default_rng(K * N)
    x = jnp.asarray(rng.standard_normal(K), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    for bk, bn, nw in ((64, 64, 4), (128, 16, 4), (64, 16, 2)):
        got = np.asarray(jax.jit(lambda a, b, bk=bk, bn=bn, nw=nw: gemv(
            a, b, block_k=bk, block_n=bn, num_warps=nw))(x, w), np.float64)
        np.testing.assert_allclose(got, want, atol=2.0 ** -8 * np.abs(want).max())


def test_gemv_block_sizes_and_bad_input():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(256), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    for bk, bn in ((32, 16), (256, 128), (16, 64)):
        np.testing.assert_allclose(np.asarray(gemv(x, w, block_k=bk, block_n=bn,
                                                   interpret=True)), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two dividing 128"):
        gemv(x, w, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="block_k=512 must be a power of two dividing 256"):
        gemv(x, w, block_k=512, interpret=True)
    with pytest.raises(ValueError, match="needs x \\[K\\] and w \\[K, N\\]"):
        gemv(x[None], w, interpret=True)
    with pytest.raises(ValueError, match="needs x \\[K\\] and w \\[K, N\\]"):
        gemv(x[:128], w, interpret=True)
    with pytest.raises(ValueError, match="floating"):
        gemv(x.astype(jnp.int32), w.astype(jnp.int32), interpret=True)


def test_gemv_lowers_for_an_h200():
    """One Triton kernel per call, named, with no XLA product beside it."""
    from kernel_cases import cuda_ops

    x = jax.ShapeDtypeStruct((576,), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((576, 1536), jnp.bfloat16)
    ops, text = cuda_ops(jax.jit(gemv), x, w)
    assert text.count("innerq_gemv") >= 1 and ops.count("custom_call") == 1
    assert "dot_general" not in ops and "multiply" not in ops


@pytest.mark.slow  # interpret-mode chains of 30 products per variant
def test_probe_writes_checked_rows(tmp_path):
    """benchmarks/gemv_probe.py on the CPU (interpret mode): a row per shape and variant,
    each checked against float64 before it is timed, a JSON and a plot."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gemv_probe

    gemv_probe.main(["--interpret", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gemv_probe.json").read_text())["rows"]
    assert (tmp_path / "gemv_probe.png").exists()
    assert {r["shape"] for r in rows} == set(gemv_probe.SHAPES)
    for r in rows:
        assert "error" not in r, r
        assert r["rel_err"] < 2.0 ** -7 and r["us_per_product"] > 0
    assert sum(r["variant"] == "xla" for r in rows) == len(gemv_probe.SHAPES)

"""The query's preparation and the output's finish inside the kernels.

Through the dispatch the kernels take the model's query heads and give the
model's output: signs, Hadamard rotation, sigma and softmax scale applied to q in
the kernel's prologue, the value rotation undone and the query's dtype given in
its last program (pallas_kernels/query_prep.py). Checked here against the XLA
preparation (``prepare_query`` / ``finish_output`` around the same kernel: equal
up to the order of float32 sums) and against the reference path in float32
(relative L2 < 1e-2, tests/test_kernels.py explains the bound), in Pallas
interpret mode on the CPU (``INNERQ_KERNEL_TESTS=gpu``: compiled, on a GPU).
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from innerq_jax import CacheConfig, KVCache
from innerq_jax.attention import decode_attention_layer
from innerq_jax.layout import region_sizes
from innerq_jax.reference import finish_output, prepare_query, split_heads
from kernel_cases import abstract_h200, cuda_ops
from kernel_cases import cache_after_appends as _cache
from pallas_kernels.decode import quantized_decode_attention
from pallas_kernels.query_prep import QueryPrep, check_query, hadamard_signs

INTERPRET = os.environ.get("INNERQ_KERNEL_TESTS", "interpret") != "gpu"
TOL = 1e-2

# name: (config, D, Hq, Hkv, lengths, appends, query dtype). Signs, both rotations and
# sigma (key centring and scaling, the default key_norm) together; a bf16 query (one bf16
# piece in the rotation's dot) and a float32 one (three); one head per kv head (the output
# rotation's rows padded to 16); OuterQ (no rotation).
CASES = {
    "recommended-signs-D128-gqa4-bf16": (
        CacheConfig.recommended(capacity=448, rotation_signs=True, rotation_seed=3), 128, 8, 2,
        [440, 20, 36 + 128 + 32 + 3, 300], 2, jnp.bfloat16),
    "innerq-sigma-D64-smollm-f32": (CacheConfig.innerq(capacity=384), 64, 9, 3, [380, 200, 1],
                                    1, jnp.float32),
    "innerq-h-keys-D64-mha-f32": (CacheConfig.innerq(rotation="keys", capacity=512), 64, 2, 2,
                                  [500, 70], 2, jnp.float32),
    "innerq-h-D64-mha-bf16": (CacheConfig.innerq_h(capacity=512), 64, 2, 2, [480, 33], 1,
                              jnp.bfloat16),
    "outerq-D64-gqa2-bf16": (CacheConfig.outerq(capacity=512), 64, 4, 2, [400, 150], 2,
                             jnp.bfloat16),
}


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "kernel output has NaN/Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _case(name, seed=1):
    cfg, D, Hq, Hkv, lengths, appends, dtype = CASES[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    q = (jax.random.normal(jax.random.PRNGKey(seed), (len(lengths), Hq, D)) * 2).astype(dtype)
    return cfg, cache, q


# the float32 rotation of q, one head per kv head and OuterQ's layout with -m slow (CI time;
# the recommended case pads the output rotation's rows too)
_SLOW = {"innerq-h-keys-D64-mha-f32", "innerq-h-D64-mha-bf16", "outerq-D64-gqa2-bf16"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in CASES])
def test_fused_kernel_prepares_and_finishes(name):
    """One launch from the model's q to the model's output equals the XLA preparation and
    finish around the same kernel, and the reference path."""
    cfg, cache, q = _case(name)
    layer, lengths = cache.layer(0), cache.lengths
    B, Hq, D = q.shape
    H = layer.k_scale.shape[1]
    scale = 1.0 / math.sqrt(D)
    if cfg.rotate_keys:  # the rotation is really in play: q' is far from the unrotated q'
        unrotated = split_heads(q, H).astype(jnp.float32) * layer.k_scale[:, :, None] * scale
        assert _rel(unrotated, prepare_query(q, layer, cfg, scale)) > 0.5
    if cfg.key_norm != "none":  # and the layer's sigma is not one
        assert float(jnp.std(layer.k_scale)) > 1e-3
    out = quantized_decode_attention(split_heads(q, H), layer, lengths, cfg, interpret=INTERPRET,
                                     prep=QueryPrep.of(q, scale), rotate_query="kernel")
    assert out.shape == (B, H, Hq // H, D) and out.dtype == q.dtype
    out = out.reshape(B, Hq, D).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # (a GPU's default for f32 is TF32)
        xla = finish_output(
            quantized_decode_attention(prepare_query(q, layer, cfg, scale), layer, lengths, cfg,
                                       interpret=INTERPRET),
            cfg, jnp.float32, layer.rot_signs)
    # the same kernel on q' prepared in XLA: equal up to the order of float32 sums (and one
    # bf16 rounding of the output where the query is bf16)
    tol = 2e-5 if q.dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(out, xla, rtol=tol, atol=tol * float(jnp.max(jnp.abs(xla))))
    with jax.default_matmul_precision("highest"):
        ref = decode_attention_layer(q.astype(jnp.float32), layer, lengths, cfg,
                                     backend="reference")
    assert _rel(out, ref) < TOL
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


@pytest.mark.parametrize("name", ["recommended-signs-D128-gqa4-bf16",
                                  pytest.param("innerq-sigma-D64-smollm-f32",
                                               marks=pytest.mark.slow)])
def test_dispatch_gives_the_model_output(name):
    """decode_attention_layer on the fused kernel (by default the query's rotation in XLA,
    sigma, scale and the output's finish in the kernel): the query's dtype and shape back,
    the reference's values."""
    cfg, cache, q = _case(name, seed=2)
    layer = cache.layer(0)
    out = decode_attention_layer(q, layer, cache.lengths, cfg,
                                 backend="interpret" if INTERPRET else "pallas")
    assert out.shape == q.shape and out.dtype == q.dtype
    with jax.default_matmul_precision("highest"):
        ref = decode_attention_layer(q.astype(jnp.float32), layer, cache.lengths, cfg,
                                     backend="reference")
    assert _rel(out, ref) < TOL


_REC = CacheConfig.recommended(capacity=512, rotation_signs=True)


@pytest.mark.parametrize("cfg,opts", [(CacheConfig.innerq(capacity=512), {}),
                                      (_REC, {"rotate_query": "kernel"}), (_REC, {})],
                         ids=["innerq", "recommended-rotate-in-kernel", "recommended"])
def test_dispatch_is_one_triton_launch(cfg, opts):
    """Through the dispatch (backend "pallas", a shape the Triton kernel takes) the call
    lowers for CUDA to one kernel and no op that computes: no XLA fusion prepares q or
    finishes the output (at B 1 / 4k on the H200 those cost as much as the kernel). Where
    the cache rotates keys, the query's rotation is XLA's by default (one dot)."""
    B, Hkv, D = 2, 2, 64
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    q = jax.ShapeDtypeStruct((B, 8, D), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = jax.jit(lambda q_, lay, n: decode_attention_layer(q_, lay, n, cfg, backend="pallas",
                                                          **opts))
    ops, text = cuda_ops(f, q, layer, lens)
    assert ops.count("custom_call") == 1 and "__gpu$xla.gpu.triton" in text
    if cfg.rotate_keys and not opts:
        assert ops.count("dot_general") == 1  # q @ H, XLA's
        return
    assert set(ops) <= {"custom_call", "constant", "broadcast_in_dim", "reshape",
                        "bitcast_convert", "output_operand_alias", "mesh"}, sorted(set(ops))


def test_hadamard_signs_are_the_rotation():
    from innerq_jax.cache import hadamard

    for D in (16, 64, 128):
        h = hadamard_signs(D)
        assert h.dtype == jnp.bfloat16 and set(np.unique(np.asarray(h, np.float32))) == {-1, 1}
        np.testing.assert_allclose(np.asarray(h, np.float32) / math.sqrt(D), hadamard(D),
                                   rtol=1e-6)


def test_bad_preparation_is_refused():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="softmax_scale"):
            QueryPrep(bad)
    with pytest.raises(ValueError, match="out_dtype"):
        QueryPrep(0.1, "int32")
    assert QueryPrep(1, np.float16) == QueryPrep(1.0, "float16")
    cfg = CacheConfig.innerq(capacity=512)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, 2, 2, 64).layer(0))
    with pytest.raises(ValueError, match="do not match the cache"):
        check_query(jnp.ones((2, 3, 4, 64)), layer)
    with pytest.raises(ValueError, match="floating point"):
        check_query(jnp.ones((2, 2, 4, 64), jnp.int32), layer)
    real = KVCache.create(cfg, 1, 2, 2, 64).layer(0)
    with pytest.raises(ValueError, match="rotate_query"):
        quantized_decode_attention(jnp.ones((2, 2, 4, 64)), real, jnp.asarray([3, 4]), cfg,
                                   interpret=True, prep=QueryPrep(0.1), rotate_query="gpu")


# ----------------------------------------------------------------- Mosaic GPU op
@pytest.mark.parametrize("name", ["recommended-signs-D128-gqa4-bf16",
                                  "innerq-sigma-D64-smollm-f32"])
def test_query_kernel_prepares_q_and_counts_tokens(name):
    """The Mosaic op's query kernel (interpret mode) with the preparation: q' as XLA's
    prepare_query gives it (up to the order of float32 sums), Qexp and the column constants
    those of that q' exactly as the XLA operands build them, and each sequence's
    quantized-token count."""
    from pallas_kernels import mgpu_decode as md
    from pallas_kernels.mgpu_geometry import Geometry
    from pallas_kernels.mgpu_query import query_operands_kernel

    if jax.default_backend() == "gpu" and "xla_allow_excess_precision=false" not in os.environ.get(
            "XLA_FLAGS", ""):  # (the compiled query kernel: test_mgpu_kernels' GPU tests)
        pytest.skip("interpret mode on a GPU needs XLA_FLAGS=--xla_allow_excess_precision=false")
    cfg, cache, q = _case(name, seed=3)
    layer, lengths = cache.layer(0), cache.lengths
    B, Hq, D = q.shape
    H = layer.k_scale.shape[1]
    geo = Geometry(cfg.bits, cfg.group_size, D, Hq // H, 128)
    scale = 1.0 / math.sqrt(D)
    qexp, kconst, qp, nq = query_operands_kernel(split_heads(q, H), geo, layer, lengths, cfg,
                                                 prep=QueryPrep.of(q, scale), interpret=True)
    want = prepare_query(q, layer, cfg, scale)
    assert qp.dtype == jnp.float32 and qp.shape == want.shape
    np.testing.assert_allclose(qp, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
    qe_ref, kc_ref = md.query_operands(qp, geo)
    np.testing.assert_array_equal(np.asarray(qexp, np.float32), np.asarray(qe_ref, np.float32))
    np.testing.assert_allclose(kconst, kc_ref, rtol=2e-6, atol=2e-5)
    np.testing.assert_array_equal(nq, region_sizes(lengths, cfg).quantized)
    assert int(jnp.max(nq)) > 0 and int(jnp.min(nq)) == 0  # full and empty regions both


@pytest.mark.parametrize("cfg,n_dots", [(CacheConfig.innerq(capacity=16384), 0),
                                        (CacheConfig.recommended(capacity=16384), 1)],
                         ids=["innerq", "recommended"])
def test_mosaic_op_prepares_in_its_query_kernel(cfg, n_dots):
    """Through the Mosaic op with the preparation: its query kernel, the Mosaic kernel and
    the epilogue, and in XLA nothing but the value rotation's dot where the cache rotates
    values (the epilogue's programs each hold a block of channels)."""
    from jax.sharding import use_abstract_mesh

    from pallas_kernels import mgpu_decode as md

    B, Hkv, D, Hq = 2, 2, 128, 8
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    q4 = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    prep = QueryPrep(1.0 / math.sqrt(D), "bfloat16")
    f = jax.jit(lambda q_, lay, n: md.mgpu_decode_attention(
        q_, lay, n, cfg, prep=prep, num_splits=2, windows="epilogue", query="kernel"))
    assert jax.eval_shape(f, q4, layer, lens).dtype == jnp.bfloat16
    with use_abstract_mesh(abstract_h200()):
        text = f.trace(q4, layer, lens).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2 and "mosaic_gpu" in text
    assert text.count("dot_general") == n_dots
    if not n_dots:  # nothing computes in XLA: q', its operands, the token counts, the cast
        ops = set(re.findall(r"stablehlo\.([a-z_]+)", text))
        assert ops <= {"custom_call", "constant", "broadcast_in_dim", "reshape", "mesh"}, ops

"""Pallas kernels (interpret mode on the CPU) against their references.

Tolerance. The reference is f32 throughout. The kernels feed the tensor cores
bf16 operands: q * 2**-e for the key scores and p * 2**-e for the value sum
(the codes themselves are exact in bf16). Rounding an operand to bf16 changes
it by at most 2**-9 relative (~1.1e-3 RMS); through the softmax and the
weighted sum this gives relative L2 errors of 1e-3..4e-3 here, so the bound
is 1e-2 (relative L2 over the whole output). Where the rounding is the only
difference (kernel (a) fed a bf16-exact query) the kernel must agree to 2e-5.
NaN never passes (assert_allclose and the norm both propagate it).
"""

from __future__ import annotations

import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from innerq_jax import CacheConfig, KVCache
from innerq_jax.attention import decode_attention_layer
from kernel_cases import cuda_ops
from kernel_cases import cache_after_appends as _cache
from kernel_cases import kv_with_outliers as _kv
from innerq_jax.reference import prepare_query, quantized_attention_core
from innerq_jax.layout import region_sizes
from pallas_kernels.decode import quantized_decode_attention
from pallas_kernels.query_prep import QueryPrep
from pallas_kernels.key_scores import key_scores_reference, quantized_key_scores
from pallas_kernels.value_sum import quantized_value_sum, value_sum_reference

TOL = 1e-2
# The default suite runs the kernels in interpret mode on the CPU. On the GPU
# machine, INNERQ_KERNEL_TESTS=gpu runs the same checks through the compiled
# Triton kernels (the inline PTX and the MMA layouts only exist there).
INTERPRET = os.environ.get("INNERQ_KERNEL_TESTS", "interpret") != "gpu"


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "kernel output has NaN/Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))




def _query(cache, Hq, seed=1):
    layer = cache.layer(0)
    D = cache.head_dim
    q = jax.random.normal(jax.random.PRNGKey(seed), (cache.batch, Hq, D), jnp.float32)
    return q, prepare_query(q, layer, cache.config, 1.0 / math.sqrt(D))


# name: (config, D, Hq, Hkv, lengths, appends, kernel options)
FUSED = {
    # capacity 640 -> 480 quantized slots: not a multiple of the 256-token block;
    # lengths: full, inside the sink, recent only (no quantized token), one group,
    # and one (197) whose window flushes a group during the appends
    "innerq2-G32-D128-gqa4": (CacheConfig.innerq(capacity=640), 128, 8, 2,
                             [630, 3, 140, 4 + 128 + 32 + 5, 197], 3, {}),
    "innerq2-G32-D128-gqa4-splits3": (CacheConfig.innerq(capacity=640), 128, 8, 2,
                                     [630, 520, 300], 0, {"num_splits": 3}),
    "innerq4-G64-D64-smollm": (CacheConfig.innerq(bits=4, group_size=64, recent=64, capacity=512),
                               64, 9, 3, [500, 2, 200], 2, {}),
    "innerq2-G32-D64-smollm": (CacheConfig.innerq(capacity=512), 64, 9, 3, [510, 300, 1], 1, {}),
    "innerq2-G64-D128-mha": (CacheConfig.innerq(group_size=64, capacity=512), 128, 2, 2,
                             [512, 250, 70], 3, {}),
    "innerq4-G32-D128-gqa4": (CacheConfig.innerq(bits=4, capacity=512), 128, 8, 2,
                              [505, 180, 0], 0, {}),
    "innerq2-nosink": (CacheConfig.innerq(sink=0, capacity=512), 64, 4, 1, [480, 33], 3, {}),
    # the window program in steps of 128 and 32 rows (default 64; the ring's 160 rows: a
    # masked tail); one window program for all rows (the default where a split holds
    # several blocks)
    "innerq2-G32-D128-gqa4-win128": (CacheConfig.innerq(capacity=640), 128, 8, 2,
                                     [630, 3, 140, 4 + 128 + 32 + 5, 197], 3,
                                     {"window_rows": 128, "window_programs": 1}),
    "innerq2-G32-D64-smollm-win32": (CacheConfig.innerq(capacity=512), 64, 9, 3, [510, 300, 1],
                                     1, {"window_rows": 32}),
    # the windows shared by 2 and 3 programs (the sink's 4 rows and the ring's 160 split
    # across programs: a part may start inside the sink and end inside the ring)
    "innerq2-G32-D128-gqa4-winprog3": (CacheConfig.innerq(capacity=640), 128, 8, 2,
                                       [630, 3, 140, 4 + 128 + 32 + 5, 197], 3,
                                       {"window_programs": 3}),
    "innerq2-G32-D64-smollm-winprog2": (CacheConfig.innerq(capacity=512), 64, 9, 3,
                                        [510, 300, 1], 1, {"window_programs": 2,
                                                           "window_rows": 32}),
    "outerq2-G32-D128-gqa4": (CacheConfig.outerq(capacity=640), 128, 8, 2,
                              [630, 3, 140, 300], 3, {}),
    "outerq4-G64-D64-smollm": (CacheConfig.outerq(bits=4, group_size=64, recent=64, capacity=512),
                               64, 9, 3, [500, 1, 260], 1, {}),
    "outerq2-sinks-mha": (CacheConfig.outerq(sink=4, capacity=512), 64, 2, 2, [400, 2], 2,
                          {"num_splits": 2}),
    # the mixed layouts and key groups of 16 with fp8 scales (the fidelity search's families)
    "innerq2-Kt-Vt-D64": (CacheConfig.innerq(k_axis="t", capacity=512), 64, 4, 2,
                          [500, 3, 200], 2, {}),
    "innerq2-Kd-Vd-D128": (CacheConfig.innerq(v_axis="d", capacity=512), 128, 8, 2,
                           [505, 140, 40], 1, {}),
    "innerq2-K16fp8-D64-smollm": (CacheConfig.innerq(key_group_size=16,
                                                     key_scale_dtype="float8_e4m3fn",
                                                     capacity=512), 64, 9, 3, [510, 300, 1], 1, {}),
    "innerq2-G16-fp8-D64": (CacheConfig.innerq(group_size=16, scale_dtype="float8_e4m3fn",
                                               capacity=512), 64, 4, 2, [500, 77], 1, {}),
}


# Variants of shapes the default suite already covers run with -m slow (CI time).
# (The two with a split count of their own stay in the default suite: the default rule gives
# these small shapes one block per program, so they alone run the loop over several blocks
# in one program, test_split_cases_loop_over_blocks.)
SLOW_FUSED = {"innerq4-G64-D64-smollm", "innerq2-G32-D64-smollm-win32",
              "innerq2-Kd-Vd-D128", "innerq2-G16-fp8-D64", "innerq2-G64-D128-mha"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FUSED
                                  else n for n in FUSED])
def test_fused_equals_reference(name):
    cfg, D, Hq, Hkv, lengths, appends, opts = FUSED[name]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    layer = cache.layer(0)
    _, qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
    out = quantized_decode_attention(qp, layer, cache.lengths, cfg, interpret=INTERPRET, **opts)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel(out, ref) < TOL
    # sequences with no token at all give zeros, as the reference does
    empty = np.asarray(cache.lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_op_is_one_triton_launch(name):
    """The fused op lowers for CUDA (Pallas' Triton lowering runs on the CPU under an
    abstract H200) to one kernel call and no op that computes: the region sizes and the
    live ring slots come from the lengths inside the kernel. On the H200 each extra
    launch cost about as much as the whole kernel at short contexts (KERNEL_NOTES.md)."""
    cfg, D, Hq, Hkv, lengths, _, opts = FUSED[name]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = jax.jit(lambda q, lay, n: quantized_decode_attention(q, lay, n, cfg, **opts))
    ops, text = cuda_ops(f, qp, layer, lens)
    assert ops.count("custom_call") == 1 and "__gpu$xla.gpu.triton" in text
    # what remains beside the kernel: the done-counter's zeros and free reshapes
    assert set(ops) <= {"custom_call", "constant", "broadcast_in_dim", "reshape",
                        "bitcast_convert", "output_operand_alias", "mesh"}, sorted(set(ops))


def test_fused_takes_the_callers_counters():
    """Given zeroed done-counters (as the cache write returns them), the op equals the
    reference, and lowered for a GPU it is the one kernel with no zeros of its own to
    make (its memset launch); counters of another shape or dtype are refused."""
    cfg, D, Hq, Hkv, lengths, appends, _ = FUSED["innerq2-G32-D64-smollm"]
    B = len(lengths)
    cache = _cache(cfg, B, Hkv, D, lengths, appends)
    layer = cache.layer(0)
    _, qp = _query(cache, Hq)
    ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
    out = quantized_decode_attention(qp, layer, cache.lengths, cfg, interpret=INTERPRET,
                                     counters=jnp.zeros((Hkv, B), jnp.int32))
    assert _rel(out, ref) < TOL
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qp, cache.lengths)]
    lay = jax.eval_shape(lambda: layer)
    cnt = jax.ShapeDtypeStruct((Hkv, B), jnp.int32)
    f = jax.jit(lambda q, lay, n, c: quantized_decode_attention(q, lay, n, cfg, counters=c))
    ops, text = cuda_ops(f, shapes[0], lay, shapes[1], cnt)
    assert ops.count("custom_call") == 1
    made = [ln for ln in text.splitlines() if re.search(r"stablehlo\.(constant|broadcast_in_dim)",
                                                        ln) and f"tensor<{Hkv}x{B}xi32>" in ln]
    assert not made, made  # the counters reach the kernel as given
    for bad in (jnp.zeros((Hkv, B + 1), jnp.int32), jnp.zeros((Hkv, B), jnp.float32)):
        with pytest.raises(ValueError, match="counters.*int32 zeros"):
            quantized_decode_attention(qp, layer, cache.lengths, cfg, interpret=INTERPRET,
                                       counters=bad)


# The grid the op builds in interpret mode (the CPU's: FALLBACK_SMS), traced only. On a GPU
# interpret mode is refused by design (test_interpret_mode_on_a_gpu_needs_exact_bf16_roundings),
# so these two run where CI runs them (the compiled grid: test_default_split_count_follows_the_
# devices_sm_count).
_CPU_GRID = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="reads the interpret-mode grid, which a GPU backend refuses (exact bf16 roundings)")


@_CPU_GRID
def test_split_cases_loop_over_blocks(monkeypatch):
    """The default split rule gives every small case one block per program (all blocks fit
    in one wave of the SMs); the cases with a split count of their own run several blocks
    per program, InnerQ and OuterQ, so the in-program online softmax over blocks is
    checked in the default suite. Read from the grid the op really builds."""
    from pallas_kernels import decode

    built = []
    real = decode._build_call.__wrapped__

    def spy(cfg, layout, geo, NS, chunk, *rest):
        built.append((NS, chunk // geo.BT))
        return real(cfg, layout, geo, NS, chunk, *rest)

    monkeypatch.setattr(decode, "_build_call", spy)
    for name in ("innerq2-G32-D128-gqa4-splits3", "outerq2-sinks-mha"):
        cfg, D, Hq, Hkv, lengths, _, opts = FUSED[name]
        B = len(lengths)
        layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
        qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
        n = jax.ShapeDtypeStruct((B,), jnp.int32)
        for kw, several in ((opts, True), ({}, False)):
            built.clear()
            jax.eval_shape(lambda q, lay, n, kw=kw: quantized_decode_attention(
                q, lay, n, cfg, interpret=True, **kw), qp, layer, n)
            (NS, per_program), = built
            assert (per_program >= 2) == several, (name, kw, NS, per_program)


def test_merge_in_steps_equals_reference(monkeypatch):
    """The last program's merge loads few partials in one round (every case above) and many
    in steps of 8 splits, maxima first: the stepped path, forced here on a case with 12
    partials (two steps) and sequences that hold nothing in some of them."""
    from pallas_kernels import decode

    monkeypatch.setattr(decode, "MERGE_ONCE", 0)
    decode._build_call.cache_clear()
    try:
        cfg, D, Hq, Hkv, lengths, appends, _ = FUSED["innerq2-G32-D128-gqa4-winprog3"]
        cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
        layer = cache.layer(0)
        _, qp = _query(cache, Hq)
        ref = quantized_attention_core(qp, layer, cache.lengths, cfg)
        out = quantized_decode_attention(qp, layer, cache.lengths, cfg, interpret=INTERPRET,
                                         block_tokens=128, num_splits=4, window_programs=8)
        assert _rel(out, ref) < TOL
    finally:
        decode._build_call.cache_clear()


def test_regions_exercised():
    """The fused configs cover a sequence inside the sink, one with no quantized token,
    one with exactly one quantized group, and full ones."""
    cfg, D, _, Hkv, lengths, appends, _ = FUSED["innerq2-G32-D128-gqa4"]
    cache = _cache(cfg, len(lengths), Hkv, D, lengths, appends)
    sizes = region_sizes(cache.lengths, cfg)
    nq = np.asarray(sizes.quantized)
    assert nq[1] == 0 and np.asarray(sizes.sink)[1] == 3
    assert nq[2] == 0 and np.asarray(sizes.recent)[2] > 0
    assert nq[3] == cfg.group_size
    assert nq[0] > 256  # more than one block, and a partial last block
    # the last sequence flushed a group during the appends
    pre = region_sizes(jnp.asarray(lengths) - appends, cfg).quantized
    assert nq[4] > int(pre[4])


# (the dispatch with rotations, signs and a bf16 query: tests/test_query_prep.py, by default)
@pytest.mark.parametrize("rotation", [pytest.param("keys_values", marks=pytest.mark.slow),
                                      pytest.param("keys", marks=pytest.mark.slow)])
def test_innerq_h_through_dispatch(rotation):
    cfg = CacheConfig.innerq(rotation=rotation, capacity=512)
    lengths = [500, 150, 6]
    cache = _cache(cfg, 3, 2, 64, lengths, appends=4)
    q, _ = _query(cache, 8)
    layer = cache.layer(0)
    ref = decode_attention_layer(q, layer, cache.lengths, cfg, backend="reference")
    out = decode_attention_layer(q, layer, cache.lengths, cfg, backend="interpret" if INTERPRET else "pallas")
    assert _rel(out, ref) < TOL


def test_fp8_scale_bits_decode_exactly():
    """The kernels take fp8 scales as their bits (Triton cannot fill a masked fp8 load);
    the in-kernel decode must give every one of the 256 values exactly (NaN for NaN)."""
    import ml_dtypes

    from pallas_kernels.innerq_blocks import fp8_bits_to_f32

    bits = np.arange(256, dtype=np.uint8)
    ref = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(fp8_bits_to_f32(jnp.asarray(bits)))
    nan = np.isnan(ref)
    assert nan.sum() == 2 and np.all(np.isnan(got[nan]))
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    np.testing.assert_array_equal(np.signbit(got[~nan]), np.signbit(ref[~nan]))


@pytest.mark.parametrize("bits,G,D", [(2, 32, 128), (4, 64, 64), (2, 64, 64)])
def test_key_scores_kernel(bits, G, D):
    cfg = CacheConfig.innerq(bits=bits, group_size=G, capacity=512)
    cache = _cache(cfg, 2, 2, D, [500, 200])
    layer = cache.layer(0)
    _, qp = _query(cache, 8)
    out = quantized_key_scores(qp, layer.k, interpret=INTERPRET)
    assert _rel(out, key_scores_reference(qp, layer.k)) < TOL
    # with a bf16-exact query the only rounding left is f32 accumulation
    qb = qp.astype(jnp.bfloat16).astype(jnp.float32)
    out_b = quantized_key_scores(qb, layer.k, interpret=INTERPRET)
    assert _rel(out_b, key_scores_reference(qb, layer.k)) < 2e-5


@pytest.mark.parametrize("bits,G,D,r", [(2, 32, 128, 4), (4, 32, 64, 3)])
def test_value_sum_kernel(bits, G, D, r):
    cfg = CacheConfig.innerq(bits=bits, group_size=G, capacity=512)
    cache = _cache(cfg, 2, 2, D, [500, 200])
    layer = cache.layer(0)
    n = region_sizes(cache.lengths, cfg).quantized
    Tq = cfg.quant_capacity
    p = jax.random.uniform(jax.random.PRNGKey(3), (2, 2, r, Tq)) ** 4  # peaked weights
    out = quantized_value_sum(p, layer.v, n, interpret=INTERPRET)
    assert _rel(out, value_sum_reference(p, layer.v, n)) < TOL


def test_rejects_bad_options():
    cfg = CacheConfig.innerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    _, qp = _query(cache, 1)
    with pytest.raises(ValueError, match="block_tokens"):
        quantized_decode_attention(qp, cache.layer(0), cache.lengths, cfg, interpret=INTERPRET,
                                   block_tokens=96)
    with pytest.raises(ValueError, match="window_rows"):
        quantized_decode_attention(qp, cache.layer(0), cache.lengths, cfg, interpret=INTERPRET,
                                   window_rows=48)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="window_programs.*from 1 to 8"):
            quantized_decode_attention(qp, cache.layer(0), cache.lengths, cfg,
                                       interpret=INTERPRET, window_programs=bad)


@pytest.mark.parametrize("kind", ["innerq", "outerq"])
def test_fused_agrees_with_reference_on_non_finite_keys(kind):
    """NaN in a sink key, a recent key or a quantized group: the kernel gives NaN exactly
    where the reference does (never a silent zero), and the clean heads stay close."""
    cfg = (CacheConfig.innerq if kind == "innerq" else CacheConfig.outerq)(sink=4, capacity=512)
    B, H, D, Hq = 3, 2, 64, 4
    rng = np.random.default_rng(5)
    k, v = _kv(rng, B, H, 400, D)
    lengths = np.array([400, 300, 250])
    k[0, 0, 0, 1, 5] = np.nan  # sink of sequence 0, kv head 0
    k[0, 1, 1, 290, 7] = np.nan  # recent window of sequence 1, kv head 1
    v[0, 2, 0, 40, 3] = np.inf  # a quantized value group of sequence 2, kv head 0
    k[0, 2, 1, 60, 9] = np.nan  # a quantized key group of sequence 2, kv head 1
    cache = KVCache.from_prefill(cfg, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                 lengths)
    assert int(region_sizes(cache.lengths, cfg).quantized[2]) > 60
    layer = cache.layer(0)
    _, qp = _query(cache, Hq)
    ref = np.asarray(quantized_attention_core(qp, layer, cache.lengths, cfg))
    out = np.asarray(quantized_decode_attention(qp, layer, cache.lengths, cfg,
                                                interpret=INTERPRET))
    bad = ~np.isfinite(ref)
    assert bad[0, 0].all() and bad[1, 1].all() and bad[2, 1].all() and bad[2, 0, :, 3].all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(~np.isfinite(out), bad)
    assert _rel(out[~bad], ref[~bad]) < TOL


_WITHOUT_INTERNALS = """
import jax.experimental.pallas.triton  # jax's own Pallas Triton, complete
import jax._src.pallas.triton.lowering as lowering
del lowering.register_lowering  # then as if a jax release had moved what triton_ext uses
import math, jax, jax.numpy as jnp, numpy as np
import pallas_kernels.decode as dec
from innerq_jax import CacheConfig, KVCache
from innerq_jax.reference import prepare_query, quantized_attention_core
from pallas_kernels.triton_ext import MissingJaxInternals
cfg = CacheConfig.innerq(sink=0, recent=0, capacity=64)
rng = np.random.default_rng(0)
k, v = (jnp.asarray(rng.standard_normal((1, 1, 1, 64, 64)), jnp.float32) for _ in "kv")
cache = KVCache.from_prefill(cfg, k, v, np.array([64]))
q = jnp.asarray(rng.standard_normal((1, 2, 64)), jnp.float32)
qp = prepare_query(q, cache.layer(0), cfg, 1 / math.sqrt(64))
ref = quantized_attention_core(qp, cache.layer(0), cache.lengths, cfg)
out = dec.quantized_decode_attention(qp, cache.layer(0), cache.lengths, cfg, interpret=True)
assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2
try:
    dec.quantized_decode_attention(qp, cache.layer(0), cache.lengths, cfg, interpret=False)
except MissingJaxInternals as err:
    print("RAISED", err)
"""


def test_missing_jax_internals_fail_at_the_kernel_naming_the_version():
    """Without the internals the Triton rules need, the package still imports and
    interpret mode still runs; a compiled launch raises, naming the jax version needed."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    # On the CPU, as in CI: what is checked is where the missing internals surface, not
    # the device (interpret mode on a GPU needs an XLA flag:
    # test_interpret_mode_on_a_gpu_needs_exact_bf16_roundings).
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _WITHOUT_INTERNALS], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "RAISED the compiled Pallas Triton kernels use jax internals checked with jax " \
           "0.11.2" in r.stdout
    assert f"this jax {jax.__version__} does not provide" in r.stdout


def test_interpret_mode_on_a_gpu_needs_exact_bf16_roundings(monkeypatch):
    """XLA on a GPU drops f32 -> bf16 -> f32 round trips unless told not to, and the kernels'
    offsets rely on them (rel. err 1e-1 on an H200, round 9): interpret mode there raises,
    naming the flag; with the flag, or on the CPU, it runs."""
    from pallas_kernels.triton_ext import check_interpret_platform

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(RuntimeError, match="xla_allow_excess_precision=false"):
        check_interpret_platform("gpu")
    check_interpret_platform("cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_allow_excess_precision=false")
    check_interpret_platform("gpu")
    # every interpreted kernel whose math needs the roundings checks at each call (through
    # call_quietly, so a build cached by an earlier CPU test does not skip it): a GPU
    # default backend without the flag is refused
    cfg = CacheConfig.innerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    q, qp = _query(cache, 2)
    layer = cache.layer(0)
    Tq = layer.k.codes.shape[2]
    p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), qp.shape[:3] + (Tq,)), -1)
    nq = region_sizes(cache.lengths, cfg).quantized
    calls = {
        "fused": lambda: decode_attention_layer(q, layer, cache.lengths, cfg,
                                                backend="interpret"),
        "key scores": lambda: quantized_key_scores(qp, layer.k, interpret=True),
        "value sum": lambda: quantized_value_sum(p, layer.v, nq, interpret=True),
    }
    for run in calls.values():  # built once on the CPU
        assert np.all(np.isfinite(np.asarray(run())))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for run in calls.values():
        with pytest.raises(RuntimeError, match="interpret mode on a GPU"):
            run()


def test_missing_pallas_triton_names_the_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "pallas_kernels.decode", None)
    cfg = CacheConfig.innerq(capacity=512)
    cache = _cache(cfg, 1, 1, 64, [100])
    q, _ = _query(cache, 2)
    with pytest.raises(ImportError, match=r"checked with jax 0\.11\.2; this jax"):
        decode_attention_layer(q, cache.layer(0), cache.lengths, cfg, backend="interpret")


@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 64), (4, 4, 128)])
def test_dense_bf16_kernel_matches_reference(Hq, Hkv, D):
    """The bf16 cache's GPU path (jax's Pallas decode kernel, mapped over [B, Hkv])
    against the f32 reference, with ragged lengths that end inside a split."""
    cfg = CacheConfig.bf16(capacity=512)
    lengths = np.array([512, 300, 17])
    rng = np.random.default_rng(7)
    k, v = _kv(rng, 3, Hkv, 512, D)
    cache = KVCache.from_prefill(cfg, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                 lengths)
    q = jnp.asarray(rng.standard_normal((3, Hq, D)), jnp.float32)
    ref = decode_attention_layer(q, cache.layer(0), cache.lengths, cfg, backend="reference")
    out = decode_attention_layer(q, cache.layer(0), cache.lengths, cfg,
                                 backend="interpret" if INTERPRET else "pallas")
    # q is rounded to bf16 for the kernel: the same 1e-2 bound as above
    assert _rel(out, ref) < TOL


def test_default_split_count_follows_the_devices_sm_count():
    """The fused kernel's default grid reads the SM count from the device (``core_count``),
    not a constant: one block per program where all blocks fit in one wave of the SMs, else
    about 4 programs per SM over B x H pairs, at least 2 blocks each; a device reporting
    none (a CPU) gets the H100 / H200 figure."""
    from types import SimpleNamespace

    from pallas_kernels import decode
    from pallas_kernels.device_info import FALLBACK_SMS, sm_count

    assert sm_count(SimpleNamespace(core_count=78)) == 78
    assert sm_count(SimpleNamespace()) is None
    assert sm_count(SimpleNamespace(core_count=0)) is None
    # B 1, 8 kv heads, 1024 blocks: 4 * sms / 8 programs per pair
    assert decode._default_splits(1, 8, 1024, 132) == 66
    assert decode._default_splits(1, 8, 1024, 78) == 39
    assert decode._default_splits(64, 8, 1024, 132) == 1
    # one wave (B * H * blocks <= SMs): one block per program
    assert decode._default_splits(1, 3, 7, 132) == 7  # SmolLM2 B 1 / 1k
    assert decode._default_splits(1, 3, 31, 132) == 31
    assert decode._default_splits(1, 3, 31, 78) == 15  # more blocks than SMs: two each
    assert decode._default_splits(1, 8, 31, 132) == 15  # the 8B shape's B 1 / 4k
    assert FALLBACK_SMS == 132


@_CPU_GRID
def test_default_window_programs(monkeypatch):
    """Three programs share the windows where every split is one block and the merge still
    loads all partials in one round; one elsewhere. Read from the grid the op builds."""
    from pallas_kernels import decode

    assert decode._default_window_programs(7, 7, 4, 64) == 3  # SmolLM2 B 1 / 1k
    assert decode._default_window_programs(31, 31, 4, 64) == 1  # 4k: 34 partials, stepped merge
    assert decode._default_window_programs(15, 31, 8, 128) == 1  # two blocks per split
    # a cache that rotates values, through the dispatch: the merge holds 16 rows (the
    # rotation's dot), so at SmolLM2 B 1 / 1k three window programs would step the merge
    rec = CacheConfig.recommended()
    assert decode._merge_rows(4, rec, None) == 4
    assert decode._merge_rows(4, rec, QueryPrep(0.125, "float32")) == 16
    assert decode._merge_rows(4, CacheConfig.innerq(), QueryPrep(0.125, "float32")) == 4
    assert decode._default_window_programs(7, 7, 16, 64) == 1
    built = []
    real = decode._build_call.__wrapped__

    def spy(cfg, layout, geo, NS, chunk, shapes, nw, ns, interp, rows, wp, *rest):
        built.append((NS, chunk // geo.BT, wp))
        return real(cfg, layout, geo, NS, chunk, shapes, nw, ns, interp, rows, wp, *rest)

    monkeypatch.setattr(decode, "_build_call", spy)
    cfg, D, Hq, Hkv, lengths, _, _ = FUSED["innerq2-G32-D64-smollm"]
    B = len(lengths)
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    n = jax.ShapeDtypeStruct((B,), jnp.int32)
    for kw, want in (({}, 3), ({"window_programs": 2}, 2)):
        built.clear()
        jax.eval_shape(lambda q, lay, n, kw=kw: quantized_decode_attention(
            q, lay, n, cfg, interpret=True, **kw), qp, layer, n)
        (NS, per_program, wp), = built
        assert per_program == 1 and wp == want, (kw, NS, per_program, wp)

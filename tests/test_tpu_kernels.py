"""The Pallas TPU decode attention, run by Pallas' TPU interpreter on the CPU.

References. Every case is checked twice: against
``innerq_jax.reference.quantized_attention_core`` (float32, the contract every
kernel implements) and against the float64 numpy oracle of ``tests/oracle.py``,
written separately (it dequantizes the stored cache by the documented layout and
runs a plain softmax attention).

Tolerance. The kernel feeds the MXU bf16 operands with float32 accumulation:
the expanded query (InnerQ) or query times scale (OuterQ) for the key scores,
p (or p times scale) for the value sums. The codes are exact small integers in
bf16 and the scales are stored in bf16, so the only new error is rounding those
operands to bf16, at most 2**-9 relative. Rounding q alone is what any bf16
attention kernel does; its effect on the exact result (the float64 oracle fed
bf16(q')) is measured per case, 1.1e-3..3.3e-3 here, and the kernel must stay
within twice that plus 2e-3, and under 1e-2 relative L2 over the whole output
in any case (the GPU kernels' bound). Measured (``-s`` prints them): InnerQ
5e-4..5.6e-3, OuterQ 1.4e-3..3.8e-3; OuterQ sits above the q' rounding because
its scale is folded into the bf16 operand (q*s, p*s) and its uncentred keys
(KIVI preset) give large offsets. The bf16 windows use a hi/lo split and the
offset terms float32 products, so they add nothing visible. NaN never passes.

What the interpreter checks and what it does not (jax 0.11.2). The interpreter
runs the kernel's jaxpr with numpy-like semantics: it accepts reshapes,
einshapes and dot shapes that Mosaic may lower differently or reject, and it
does not run Mosaic's layout passes or compiler (those live in libtpu). The
lowering test below runs Pallas' own Mosaic lowering for v5e and v6e (the Python
half: block-shape rules, supported primitives), which catches part of that.
Partial blocks read past the array end: a TPU returns unspecified values there,
the interpreter NaN (floats) or the largest integer, which the tests rely on to
show that the kernel masks them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from innerq_jax import CacheConfig
from innerq_jax import attention as attention_mod
from innerq_jax.attention import decode_attention_layer
from innerq_jax.cache import QuantLayer
from innerq_jax.layout import region_sizes
from innerq_jax.reference import prepare_query, quantized_attention_core
from pallas_kernels import tpu_decode
from pallas_kernels.tpu_decode import (
    quantized_decode_attention_tpu,
    quantized_decode_attention_tpu_reference,
    static_validate_inputs,
)

TOL = 1e-2


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "kernel output has NaN/Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# jitted: one compile per shape is several times cheaper than op-by-op dispatch here
_prefill = jax.jit(QuantLayer.prefill, static_argnums=3)
_core = jax.jit(quantized_attention_core, static_argnums=3)


def _layer(cfg, H, D, lengths, appends=0, seed=0):
    """A QuantLayer prefilled to ``lengths - appends``, then grown one token at a time
    through the cache's own append (flushes included). Keys have channel offsets and
    outlier channels; values are normal."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    B, T = len(lengths), int(lengths.max()) + 1
    k = rng.standard_normal((B, H, T, D)) + 1.5 * rng.standard_normal(D)
    k[..., rng.choice(D, 3, replace=False)] *= 8.0
    v = rng.standard_normal((B, H, T, D))
    v[..., rng.integers(D)] *= 4.0
    pre = np.maximum(lengths - appends, 0)
    Tp = max(int(pre.max()), 1)
    layer = _prefill(jnp.asarray(k[:, :, :Tp], jnp.float32), jnp.asarray(v[:, :, :Tp], jnp.float32),
                     jnp.asarray(pre), cfg)
    @jax.jit
    def step(lay, kk, vv, n, grow):  # sequences already at their length keep their cache
        new = lay.append(kk, vv, n, cfg)
        return jax.tree.map(lambda a, b: jnp.where(grow.reshape((B,) + (1,) * (a.ndim - 1)), a, b),
                            new, lay)

    n = pre.copy()
    for _ in range(appends):
        idx = np.minimum(n, T - 1)
        kn = np.stack([k[b, :, idx[b]] for b in range(B)])
        vn = np.stack([v[b, :, idx[b]] for b in range(B)])
        grow = n < lengths
        layer = step(layer, jnp.asarray(kn, jnp.float32), jnp.asarray(vn, jnp.float32),
                     jnp.asarray(n), jnp.asarray(grow))
        n = n + grow
    return layer, jnp.asarray(lengths)


def _oracle(qp, layer, lengths, cfg) -> np.ndarray:
    """float64 attention over the dequantized stored cache, per (sequence, head)."""
    qp = np.asarray(qp, np.float64)
    B, H, r, D = qp.shape
    out = np.zeros((B, H, r, D))
    for b in range(B):
        for h in range(H):
            ks, vs, _ = oracle.materialize(layer, b, h, int(lengths[b]), cfg)
            out[b, h] = oracle.softmax_attention(qp[b, h], ks, vs, np.ones(len(ks), bool))
    return out


def _query(layer, cfg, r, seed=1):
    B, H, D = layer.k_scale.shape
    q = jax.random.normal(jax.random.PRNGKey(seed), (B, H * r, D), jnp.float32)
    return q, jax.jit(prepare_query, static_argnums=(2, 3))(q, layer, cfg, 1.0 / math.sqrt(D))


def _count_key_block_reads(monkeypatch) -> list[tuple[int, int, int]]:
    """Records the grid point (b, h, i) of every key-word block the TPU interpreter copies
    in. The interpreter copies an input block only when its index changes, as the TPU
    pipeline does (jax 0.11.2 internals: ``interpret_pallas_call.get`` receives the
    input's name and the grid point)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    reads, orig = [], ipc.get

    def counting_get(*args, input_name=None, **kw):
        if input_name == "kw_ref":
            reads.append(tuple(int(x) for x in args[7]))
        return orig(*args, input_name=input_name, **kw)

    monkeypatch.setattr(ipc, "get", counting_get)
    return reads


# name: (config, D, n_rep, Hkv, lengths, appends, block_rows)
# Lengths cover: inside the sink (3 or 1 < S), no token past the sink (4 == S),
# inside the first group (rest < G, all recent), exactly one quantized group,
# a partial and a full last block, several blocks and an empty sequence (0).
# Prefill alone puts tokens in every region and wraps the recent ring; the slow
# test adds appends that flush groups. Each case costs one XLA compile of the
# interpreted kernel (several seconds of CPU), so the default cases cover each
# value of the grid once per layout (2 and 4 bits, G 32 and 64, D 64 and 128,
# GQA and MHA; the dispatch test adds InnerQ MHA) and the other combinations
# run with -m slow.
CASES = {
    "innerq2-G32-D128-gqa4": (CacheConfig.innerq(capacity=640), 128, 4, 1,
                              [630, 3, 4 + 20, 4 + 128 + 32 + 5, 4 + 128 + 256 + 1, 0], 0, 16),
    "innerq4-G64-D64-smollm-fp16scales": (CacheConfig.innerq(bits=4, group_size=64, recent=64,
                                                             scale_dtype="float16",
                                                             capacity=1088),
                               64, 3, 1, [1080, 2, 4 + 64 + 64 + 3, 700], 0, 64),
    "outerq2-G32-D128-gqa4": (CacheConfig.outerq(capacity=640), 128, 4, 1,
                              [630, 1, 20, 300, 128 + 32 + 1], 0, 16),
    "outerq4-sinks-G64-D64-mha": (CacheConfig.outerq(bits=4, sink=4, group_size=64, recent=64,
                                                     capacity=1088),
                                  64, 1, 2, [1080, 2, 4 + 10, 4 + 64 + 64 + 1, 520], 0, 64),
}
SLOW_CASES = {
    "innerq4-G32-D128-gqa4": (CacheConfig.innerq(bits=4, capacity=640), 128, 4, 1,
                              [505, 4, 180, 611], 0, 32),
    "innerq2-G64-D128-mha": (CacheConfig.innerq(group_size=64, capacity=1216), 128, 1, 2,
                             [1190, 70, 4 + 128 + 64 + 2, 600], 0, 32),
    "outerq4-G64-D64-smollm": (CacheConfig.outerq(bits=4, group_size=64, recent=64,
                                                  capacity=1088),
                               64, 3, 1, [1080, 1, 64 + 64 + 1, 520], 0, 64),
    "outerq2-sinks-G64-D128-mha": (CacheConfig.outerq(sink=4, group_size=64, capacity=1216), 128,
                                   1, 1, [1150, 2, 4 + 10, 400], 0, 32),
    "innerq2-appends": (CacheConfig.innerq(capacity=640), 128, 4, 1,
                        [630, 3, 4 + 128 + 32 + 5, 197], 3, 16),
}
ALL_CASES = CASES | SLOW_CASES
# InnerQ-H through the dispatch, default block_rows: (config, D, n_rep, Hkv, lengths)
DISPATCH_CASE = (CacheConfig.innerq_h(capacity=640), 64, 1, 2, [600, 150, 6])


@pytest.mark.parametrize(
    "name", list(CASES) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CASES])
def test_kernel_equals_references(name, monkeypatch):
    """Output against both references, and the blocks the pipeline copied in: every
    (sequence, head) reads exactly its non-empty quantized blocks (one when it has none),
    because the clamped index map asks for the resident block past a sequence's end."""
    cfg, D, r, H, lengths, appends, rows = ALL_CASES[name]
    layer, lengths = _layer(cfg, H, D, lengths, appends)
    _, qp = _query(layer, cfg, r)
    geo = static_validate_inputs(qp, layer, lengths, cfg, rows)
    reads = _count_key_block_reads(monkeypatch)
    out = quantized_decode_attention_tpu(qp, layer, lengths, cfg, block_rows=rows, interpret=True)
    jax.block_until_ready(out)
    nq = np.asarray(region_sizes(lengths, cfg).quantized)
    for b in range(len(nq)):
        for h in range(H):
            fetched = sorted(i for (bb, hh, i) in reads if (bb, hh) == (b, h))
            assert fetched == list(range(max(1, -(-int(nq[b]) // geo.BT)))), (b, h, fetched)
    ref = _core(qp, layer, lengths, cfg)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    exact = _oracle(qp, layer, np.asarray(lengths), cfg)
    inherent = _rel(_oracle(qp.astype(jnp.bfloat16).astype(jnp.float32), layer,
                            np.asarray(lengths), cfg), exact)
    err_ref, err_exact = _rel(out, ref), _rel(out, exact)
    print(f"{name}: rel L2 vs float32 reference {err_ref:.1e}, vs float64 oracle {err_exact:.1e}"
          f" (bf16 q' alone: {inherent:.1e})")
    assert err_ref < TOL and err_exact < TOL
    assert err_exact < 2 * inherent + 2e-3
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


def test_cases_cover_the_regions():
    """The grid above really holds the region shapes it claims."""
    seen = set()
    cases = list(CASES.values()) + [DISPATCH_CASE + (0, None)]
    for cfg, D, r, H, lengths, appends, rows in cases:
        n = jnp.asarray(lengths)
        s = region_sizes(n, cfg)
        empty_layer = jax.eval_shape(functools.partial(QuantLayer.create, len(lengths), H, D, cfg))
        geo = static_validate_inputs(jnp.zeros((len(lengths), H, r, D)), empty_layer, n, cfg, rows)
        for L, sink, nq, rec in zip(lengths, s.sink.tolist(), s.quantized.tolist(),
                                    s.recent.tolist()):
            if L == 0:
                seen.add("empty")
            elif L < cfg.sink:
                seen.add("inside sink")
            elif nq == 0 and 0 < rec < cfg.group_size:
                seen.add("inside first group")
            elif nq == cfg.group_size:
                seen.add("one quantized group")
            if nq > geo.BT:
                seen.add("several blocks")
            if nq % geo.BT:
                seen.add("partial block")
        if geo.Tq % geo.BT:
            seen.add("array ends inside a block")
        seen.add((cfg.kind, cfg.bits, cfg.group_size, D, "mha" if r == 1 else "gqa"))
    for want in ("empty", "inside sink", "inside first group", "one quantized group",
                 "several blocks", "partial block", "array ends inside a block"):
        assert want in seen, want
    for kind in ("innerq", "outerq"):  # every value of the grid, in each layout
        tuples = [x for x in seen if isinstance(x, tuple) and x[0] == kind]
        assert {x[1] for x in tuples} == {2, 4}, kind
        assert {x[2] for x in tuples} == {32, 64}, kind
        assert {x[3] for x in tuples} == {64, 128}, kind
        assert {x[4] for x in tuples} == {"mha", "gqa"}, kind


def test_dispatch_tpu_interpret_backend():
    """InnerQ-H (D 64, 2 bits, G 32, MHA) through decode_attention_layer: the rotations
    stay outside the kernel. Default block_rows: one block over the whole quantized
    region, which ends inside it."""
    cfg, D, r, H, lengths = DISPATCH_CASE
    layer, lengths = _layer(cfg, H, D, lengths)
    q, _ = _query(layer, cfg, r)
    geo = static_validate_inputs(jnp.zeros((len(lengths), H, r, D)), layer, lengths, cfg)
    assert geo.num_blocks == 1 and geo.Tq % geo.BT
    ref = jax.jit(decode_attention_layer, static_argnames=("cfg", "backend"))(
        q, layer, lengths, cfg=cfg, backend="reference")
    out = decode_attention_layer(q, layer, lengths, cfg, backend="tpu-interpret")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < TOL


def test_auto_backend_picks_the_tpu_kernel_on_tpu(monkeypatch):
    attention_mod._default_backend.cache_clear()
    try:
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
        assert attention_mod._default_backend() == "tpu"
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        attention_mod._default_backend.cache_clear()
        assert attention_mod._default_backend() == "pallas"
        monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
        attention_mod._default_backend.cache_clear()
        assert attention_mod._default_backend() == "reference"
    finally:
        attention_mod._default_backend.cache_clear()


def test_kernel_checks_its_operands():
    """Operands swapped by a caller fail at trace time, naming the operand."""
    geo = tpu_decode.TpuGeometry(kind="innerq", bits=2, G=32, D=128, n_rep=4, Tq=4096, S=4,
                                 W=160, block_rows=16)
    refs = {name: jax.ShapeDtypeStruct(shape, dtype)
            for name, (shape, dtype) in tpu_decode.block_shapes(geo).items()}
    tpu_decode._check_refs(geo, refs)
    refs["ks"], refs["vs"] = refs["vs"], refs["ks"]
    with pytest.raises(ValueError, match=r"kernel operand ks: block \(8, 128\) bfloat16, "
                                         r"expected \(16, 64\) bfloat16"):
        tpu_decode._check_refs(geo, refs)


def test_block_index_is_clamped():
    geo = tpu_decode.TpuGeometry(kind="innerq", bits=2, G=32, D=128, n_rep=4, Tq=4096, S=4,
                                 W=160, block_rows=16)  # BT = 256
    nq = jnp.asarray([0, 1, 256, 257, 4096], jnp.int32)
    got = [[int(tpu_decode.quantized_block_index(i, b, nq, geo)) for i in range(geo.num_blocks)]
           for b in range(len(nq))]
    last = [0, 0, 0, 1, 15]
    for b, row in enumerate(got):
        assert row == [min(i, last[b]) for i in range(geo.num_blocks)]


@pytest.mark.parametrize("make", [CacheConfig.innerq, CacheConfig.outerq])
@pytest.mark.parametrize("bits,G,D,r", [(2, 32, 128, 4), (4, 32, 128, 4), (2, 64, 128, 1),
                                        (2, 32, 64, 3), (4, 64, 64, 3)])
def test_vmem_budget_of_the_default_block(make, bits, G, D, r):
    """The default block's VMEM (benchmarks/TPU_NOTES.md): pipelined blocks under 1 MiB and
    everything, values included, under 8 MiB, a sixteenth of v5e's and v6e's 128 MiB."""
    cfg = make(bits=bits, group_size=G, capacity=32768)
    layer = jax.eval_shape(functools.partial(QuantLayer.create, 1, 1, D, cfg))
    geo = static_validate_inputs(jnp.zeros((1, 1, r, D)), layer, jnp.zeros(1, jnp.int32), cfg)
    budget = tpu_decode.vmem_budget(geo)
    assert geo.block_rows == 128
    assert sum(v for k, v in budget.items() if "x2 buffers" in k) < 2**20
    assert sum(budget.values()) < 8 * 2**20


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("kind,bits,G,D,r", [("innerq", 2, 32, 128, 4), ("outerq", 2, 32, 128, 4),
                                             ("innerq", 4, 64, 64, 3), ("outerq", 4, 64, 64, 1)])
def test_mosaic_lowering_accepts_the_kernel(device_kind, kind, bits, G, D, r):
    """Pallas' Mosaic TPU lowering (block-shape rules, supported primitives) on the CPU,
    for the default TPU block size; Mosaic's own compiler runs only on a TPU."""
    make = CacheConfig.innerq if kind == "innerq" else CacheConfig.outerq
    cfg = make(bits=bits, group_size=G, capacity=8192)
    B, H = 2, 2
    layer = jax.eval_shape(lambda: QuantLayer.create(B, H, D, cfg))
    qp = jax.ShapeDtypeStruct((B, H, r, D), jnp.float32)
    n = jax.ShapeDtypeStruct((B,), jnp.int32)
    fn = jax.jit(lambda q_, l_, n_: quantized_decode_attention_tpu(q_, l_, n_, cfg))
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = fn.trace(qp, layer, n).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_rejects_bad_inputs():
    cfg = CacheConfig.innerq(capacity=640)
    layer, n = _layer(cfg, 1, 64, [100])
    _, qp = _query(layer, cfg, 1)
    with pytest.raises(ValueError, match=r"block_rows=24 must be a positive multiple of 16"):
        quantized_decode_attention_tpu(qp, layer, n, cfg, block_rows=24, interpret=True)
    with pytest.raises(ValueError, match=r"block_rows=24"):
        quantized_decode_attention_tpu_reference(qp, layer, n, cfg, block_rows=24)
    with pytest.raises(ValueError, match=r"qp.shape=\(1, 1, 1, 32\)"):
        quantized_decode_attention_tpu(qp[..., :32], layer, n, cfg, interpret=True)
    with pytest.raises(ValueError, match=r"lengths.shape=\(2,\) must be \(1,\)"):
        quantized_decode_attention_tpu(qp, layer, jnp.zeros(2, jnp.int32), cfg, interpret=True)
    with pytest.raises(ValueError, match=r"does not match cfg.kind='outerq'"):
        quantized_decode_attention_tpu(qp, layer, n, CacheConfig.outerq(capacity=640),
                                       interpret=True)
    with pytest.raises(ValueError, match=r"cfg.kind='bf16'"):
        quantized_decode_attention_tpu(qp, layer, n, CacheConfig.bf16(capacity=640),
                                       interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("make", [CacheConfig.innerq, CacheConfig.outerq, CacheConfig.innerq_h])
def test_long_cache_default_blocks(make):
    """The TPU default block (128 word rows: 2048 tokens) over several blocks."""
    cfg = make(capacity=6016)
    layer, n = _layer(cfg, 2, 128, [5990, 2100, 4100, 30, 2], appends=40)
    _, qp = _query(layer, cfg, 4)
    ref = _core(qp, layer, n, cfg)
    out = quantized_decode_attention_tpu(qp, layer, n, cfg, interpret=True)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("kind", ["innerq", "outerq"])
def test_agrees_with_reference_on_non_finite_keys(kind):
    """NaN in a sink key, a recent key or a quantized group, Inf in a quantized value:
    NaN exactly where the reference has it (never a silent zero), the rest as close as
    usual."""
    cfg = (CacheConfig.innerq if kind == "innerq" else CacheConfig.outerq)(sink=4, capacity=512)
    rng = np.random.default_rng(5)
    k = rng.standard_normal((3, 2, 400, 64)) + 1.5 * rng.standard_normal(64)
    v = rng.standard_normal((3, 2, 400, 64))
    k[0, 0, 1, 5] = np.nan  # sink of sequence 0, kv head 0
    k[1, 1, 290, 7] = np.nan  # recent window of sequence 1, kv head 1
    v[2, 0, 40, 3] = np.inf  # a quantized value group of sequence 2, kv head 0
    k[2, 1, 60, 9] = np.nan  # a quantized key group of sequence 2, kv head 1
    lengths = jnp.array([400, 300, 250], jnp.int32)
    layer = _prefill(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), lengths, cfg)
    _, qp = _query(layer, cfg, 2)
    ref = np.asarray(_core(qp, layer, lengths, cfg))
    out = np.asarray(quantized_decode_attention_tpu(qp, layer, lengths, cfg, interpret=True))
    bad = ~np.isfinite(ref)
    assert bad[0, 0].all() and bad[1, 1].all() and bad[2, 1].all() and bad[2, 0, :, 3].all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(~np.isfinite(out), bad)
    assert _rel(out[~bad], ref[~bad]) < TOL

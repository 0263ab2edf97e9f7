"""Decode updates the cache in place: checked on XLA's own compiled artefacts.

For the decode step, the generation loop and the evaluation's teacher-forced
loop, compiled for bf16 and InnerQ caches at two capacities 4x apart:

* the donated cache is aliased with the returned one, byte for byte (the
  buffers are reused, not copied);
* the temporaries do not grow with the cache: a path that copied a layer's or
  the whole cache (a layer scan taking the cache as xs and returning it as ys,
  a branch returning whole tensors, an upcast of a layer) would add temporaries
  in proportion to the capacity;
* the step reads each weight once, through a matmul: the query, key and value
  projections are one matmul per layer (on the CPU, in the lowered step), and on a
  GPU no weight-sized reduction is left in the compiled step at one sequence (XLA's
  GPU simplifier turns small vector-matrix dots into a multiply and a reduce, above its
  size limit; below it, as in SmolLM2's step, it does so whatever the code, round 25).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from innerq_jax import CacheConfig
from models import evaluate
from models.generate import Sampling, _generate
from models.llama import Llama, ModelConfig, cache_for, jit_decode_step

MC = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=64, max_positions=1 << 16)
B = 2
CAPACITIES = (2048, 8192)


@pytest.fixture(scope="module")
def model():
    return Llama(MC, nnx.Rngs(0))


def _config(kind: str, capacity: int) -> CacheConfig:
    return {"bf16": CacheConfig.bf16, "innerq": CacheConfig.innerq}[kind](capacity=capacity)


def _growth(measure, kind):
    """(cache bytes, temporaries) at both capacities."""
    return [measure(_config(kind, c)) for c in CAPACITIES]


def _assert_flat(rows, what):
    (c0, t0), (c1, t1) = rows
    # 4x the capacity adds (c1 - c0) cache bytes; temporaries may not follow.
    assert t1 - t0 <= 0.01 * (c1 - c0), (
        f"{what}: temporaries grew by {t1 - t0} bytes when the cache grew by {c1 - c0}")
    assert t1 < 0.5 * c1, f"{what}: {t1} bytes of temporaries for a {c1}-byte cache"


@pytest.mark.parametrize("kind", ["bf16", "innerq"])
def test_decode_step_updates_cache_in_place(model, kind):
    def measure(cfg):
        cache = cache_for(model, cfg, B)
        ma = jit_decode_step.lower(model, cache, jnp.ones((B,), jnp.int32)).compile() \
            .memory_analysis()
        assert ma.alias_size_in_bytes == cache.total_nbytes(), "donated cache not aliased"
        return cache.total_nbytes(), ma.temp_size_in_bytes

    _assert_flat(_growth(measure, kind), "decode step")


@pytest.mark.parametrize("kind,penalty", [("bf16", 1.0), ("innerq", 1.0), ("innerq", 1.2)])
def test_generation_loop_keeps_one_cache(model, kind, penalty):
    """Also with a repetition penalty (its record of the tokens seen is [B, vocab], carried
    by the loop): no temporary grows with the cache's capacity."""
    prompt = jnp.ones((B, 16), jnp.int32)

    def measure(cfg):
        ma = _generate.lower(model, prompt, jnp.array([16, 9]), cfg, 8,
                             Sampling(repetition_penalty=penalty), (), "auto",
                             None).compile().memory_analysis()
        cache_bytes = cache_for(model, cfg, B).total_nbytes()
        # the loop's cache is the returned one, not a temporary beside it
        assert ma.output_size_in_bytes >= cache_bytes
        return cache_bytes, ma.temp_size_in_bytes

    _assert_flat(_growth(measure, kind), "generation loop")


@pytest.mark.parametrize("kind", ["bf16", "innerq"])
def test_evaluation_loop_keeps_one_cache(model, kind):
    windows = jnp.ones((B, 64), jnp.int32)

    def measure(cfg):
        ma = evaluate._score_windows.lower(model, windows, (cfg,), 32, "reference").compile() \
            .memory_analysis()
        cache_bytes = cache_for(model, cfg, B).total_nbytes()
        # the cache lives inside the loop (it is not returned): it is the one
        # temporary allowed to grow with the capacity
        return cache_bytes, ma.temp_size_in_bytes - cache_bytes

    rows = _growth(measure, kind)
    (c0, t0), (c1, t1) = rows
    assert t0 >= 0 and t1 >= 0
    assert t1 - t0 <= 0.01 * (c1 - c0), f"evaluation: extra temporaries grew by {t1 - t0}"


def test_projections_are_one_matmul_per_layer(model):
    """The step's StableHLO: one dot per layer reads the fused ``qkv`` weight (q, k and v
    from one matmul), and the attention module has no other projection in."""
    cache = cache_for(model, CacheConfig.innerq(capacity=2048), B)
    text = jit_decode_step.lower(model, cache, jnp.ones((B,), jnp.int32)).as_text()
    E, H, D = MC.hidden_size, MC.num_kv_heads, MC.head_dim
    r = MC.num_heads // H
    qkv = f"tensor<{E}x{H}x{r + 2}x{D}xbf16>"
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert sum(qkv in line for line in dots) == MC.num_layers
    assert sorted(nnx.state(model.layers[0].attn, nnx.Param)) == ["o", "qkv"]


def _weight_sized_reductions(hlo: str, min_elems: int) -> list[str]:
    """The reduce instructions of compiled HLO text whose operand has >= min_elems elements."""
    shapes = {m[1]: m[2] for m in re.finditer(r"%([\w.-]+) = \w+\[([\d,]*)\]", hlo)}
    found = []
    for m in re.finditer(r"%([\w.-]+) = \w+\[[\d,]*\]\S* reduce\(%([\w.-]+)", hlo):
        dims = shapes.get(m[2], "")
        if dims and np.prod([int(d) for d in dims.split(",")]) >= min_elems:
            found.append(f"{m[1]} reduces {m[2]} [{dims}]")
    return found


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: XLA's GPU passes")
@pytest.mark.parametrize("kind", ["bf16", "recommended"])
def test_one_sequence_step_keeps_its_matmuls_on_gpu(kind):
    """One layer of Llama-3-8B's attention shape at one sequence, compiled for the GPU:
    no reduction over a weight-sized operand (a projection strength-reduced by XLA reads
    its weight at a fraction of the bandwidth, and can be fused into the cache's write)."""
    mc = ModelConfig(vocab_size=4096, hidden_size=4096, intermediate_size=4096, num_layers=1,
                     num_heads=32, num_kv_heads=8, head_dim=128, max_positions=1 << 12)
    big = Llama(mc, nnx.Rngs(0))
    cfg = {"bf16": CacheConfig.bf16, "recommended": CacheConfig.recommended}[kind](capacity=512)
    cache = cache_for(big, cfg, 1)
    hlo = jit_decode_step.lower(big, cache, jnp.ones((1,), jnp.int32)).compile().as_text()
    assert not _weight_sized_reductions(hlo, 1 << 20)


def test_weight_sized_reductions_are_found():
    """The helper the GPU test relies on finds a strength-reduced projection's reduce in
    XLA's text form and ignores small ones."""
    hlo = """
  %convert.1 = f32[4096,1024]{1,0} convert(%param_0.1), metadata={op_name="dot_general"}
  %reduce.2 = f32[1024]{0} reduce(%convert.1, %constant_0), dimensions={0}, to_apply=%add
  %small.3 = f32[8,128]{1,0} multiply(%a, %b)
  %reduce.4 = f32[8]{0} reduce(%small.3, %constant_0), dimensions={1}, to_apply=%add
"""
    assert _weight_sized_reductions(hlo, 1 << 20) == ["reduce.2 reduces convert.1 [4096,1024]"]
    # and in the H200's own compiled step before the fused projection (separate q/k/v
    # weights, round 18's evidence): the key projection's and the value projection's reduces
    old = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / \
        "e2e_h200_round17longhlo_excerpt.txt"
    found = _weight_sized_reductions(old.read_text(), 1 << 20)
    assert len(found) == 2 and all(f.endswith("[4096,1024]") for f in found), found
    # and SmolLM2's step (round 24's excerpt; every weight under the size limit): five of
    # them per layer, the weight-sized product written by one kernel and reduced by another
    small = old.parent / "e2e_h200_round24hlo_excerpt.txt"
    found = _weight_sized_reductions(small.read_text(), 1 << 18)
    assert len(found) == 5 and all(f.endswith("[576,1536]") for f in found), found


def test_gpu_step_hands_the_writes_counters_to_attention(model, monkeypatch):
    """Lowered for a GPU (an abstract H200; Pallas' Triton lowering runs here), each layer's
    append is one write kernel and its attention one fused kernel, and the attention takes
    its done-counters from the write kernel: the step makes no [Hkv, B] int32 zeros of its
    own (on the H200 a 1 us memset launch per layer, benchmarks/KERNEL_NOTES.md, round 22)."""
    from kernel_cases import cuda_ops
    from models.llama import decode_step

    monkeypatch.setenv("INNERQ_CACHE_WRITER", "pallas")
    cfg = CacheConfig.innerq(capacity=2048)
    cache = jax.eval_shape(lambda: cache_for(model, cfg, B))
    tokens = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = jax.jit(lambda c, t: decode_step(model, c, t, backend="pallas"))
    _, text = cuda_ops(f, cache, tokens)
    assert text.count('name = "innerq_cache_write"') == MC.num_layers, "one write per layer"
    assert text.count('name = "innerq_decode_attention"') == MC.num_layers
    made = [ln for ln in text.splitlines()
            if re.search(r"stablehlo\.(constant|broadcast_in_dim)", ln)
            and f"tensor<{MC.num_kv_heads}x{B}xi32>" in ln]
    assert not made, made

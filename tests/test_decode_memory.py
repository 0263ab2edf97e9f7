"""Decode updates the cache in place: checked on XLA's own compiled artefacts.

For the decode step, the generation loop and the evaluation's teacher-forced
loop, compiled for bf16 and InnerQ caches at two capacities 4x apart:

* the donated cache is aliased with the returned one, byte for byte (the
  buffers are reused, not copied);
* the temporaries do not grow with the cache: a path that copied a layer's or
  the whole cache (a layer scan taking the cache as xs and returning it as ys,
  a branch returning whole tensors, an upcast of a layer) would add temporaries
  in proportion to the capacity.
"""

from __future__ import annotations

import jax.numpy as jnp
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


@pytest.mark.parametrize("kind", ["bf16", "innerq"])
def test_generation_loop_keeps_one_cache(model, kind):
    prompt = jnp.ones((B, 16), jnp.int32)

    def measure(cfg):
        ma = _generate.lower(model, prompt, jnp.array([16, 9]), cfg, 8, Sampling(), (), "auto",
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

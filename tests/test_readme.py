"""The README's Python examples run as written (CPU: the reference path) and do what their
comments say."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from innerq_jax import CacheConfig
from models.llama import Llama, ModelConfig, jit_decode_step, prefill

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(marker: str) -> str:
    found = [b for b in _blocks() if marker in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {marker!r}"
    return found[0]


def test_cache_inside_jit_example():
    """The 'Using the cache inside jit' example: one jitted, donated step appends a token to
    every sequence and attends over layer 0; its memory ratio is the 2-bit cache's."""
    ns: dict = {}
    exec(compile(_block("donate_argnums=0"), "README.md", "exec"), ns)  # noqa: S102
    cache, out = ns["cache"], ns["out"]
    assert out.shape == (4, 32, 128) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [1001, 701, 32, 2])
    assert 0.15 < cache.total_nbytes() / cache.bf16_nbytes() < 0.3
    # the step's attention is the cache's own decode attention, computed again here
    from innerq_jax import decode_attention

    q = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 128))
    np.testing.assert_allclose(np.asarray(out), np.asarray(decode_attention(q, cache, layer=0)),
                               rtol=1e-5, atol=1e-5)


def test_decode_step_example():
    """The DecodeStep example, on a small random Llama with an InnerQ cache: one step gives
    the jitted module step's logits, then 32 greedy steps in one call."""
    mc = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=32, max_positions=512)
    model = Llama(mc, nnx.Rngs(1), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, 97, (2, 24)), jnp.int32)
    lengths = jnp.asarray([24, 17], jnp.int32)
    _, cache = prefill(model, prompts, lengths, CacheConfig.innerq(group_size=16, recent=16,
                                                                   capacity=160))
    tokens = jnp.asarray([5, 9], jnp.int32)
    expected, _ = jit_decode_step(model, jax.tree.map(jnp.copy, cache), tokens)
    ns = {"model": model, "cache": cache, "tokens": tokens}
    exec(compile(_block("DecodeStep(model)"), "README.md", "exec"), ns)  # noqa: S102
    np.testing.assert_allclose(np.asarray(ns["logits"]), np.asarray(expected), rtol=1e-5,
                               atol=1e-5)
    assert ns["chosen"].shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(ns["cache"].lengths), [24 + 33, 17 + 33])


def test_fold_value_rotation_example():
    """The fold_value_rotation example, on a small random Llama with the recommended layout:
    the folded model's prefill and step give the unfolded model's logits (float32: rounding
    and the cache's own rounding of values on a boundary), its cache is a cfg cache."""
    from models.llama import jit_prefill

    mc = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=32, max_positions=512)
    model = Llama(mc, nnx.Rngs(2), dtype=jnp.float32)
    cfg = CacheConfig.recommended(group_size=16, sink=4, recent=16, capacity=160)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 50)), jnp.int32)
    lengths = jnp.asarray([50, 41], jnp.int32)
    next_tokens = jnp.asarray([3, 7], jnp.int32)
    want, ref = jit_prefill(model, tokens, lengths, cfg)
    want, _ = jit_decode_step(model, ref, next_tokens)
    ns = {"model": model, "cfg": cfg, "tokens": tokens, "lengths": lengths,
          "next_tokens": next_tokens, "jit_prefill": jit_prefill,
          "jit_decode_step": jit_decode_step}
    exec(compile(_block("fold_value_rotation(model, cfg)"), "README.md", "exec"), ns)  # noqa: S102
    assert ns["cache"].config == cfg and ns["folded"].value_fold == -1
    np.testing.assert_allclose(np.asarray(ns["logits"]), np.asarray(want), atol=2e-3)


@pytest.mark.parametrize("block", range(len(_blocks())))
def test_every_example_is_covered(block):
    """Each python block of the README is one of the examples run above."""
    text = _blocks()[block]
    assert any(m in text for m in ("donate_argnums=0", "DecodeStep(model)",
                                   "fold_value_rotation(model, cfg)"))

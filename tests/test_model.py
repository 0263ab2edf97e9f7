"""The Flax Llama against transformers' PyTorch Llama (golden fixture), and generation."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from innerq_jax import CacheConfig
from models.generate import Sampling, generate
from models.llama import (DecodeStep, Llama, ModelConfig, decode_step, jit_decode_step, jit_prefill,
                          prefill)
from models.weights import load_checkpoint

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_golden.npz"


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURE)


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(None)


@pytest.fixture(scope="module")
def model32(ckpt):
    return Llama.from_checkpoint(ckpt, dtype=jnp.float32)


def test_prefill_logits_match_transformers(model32, golden):
    """float32 compute: only float32 summation order separates the two (tol 2e-3)."""
    for i in range(3):
        ids = golden[f"ids_{i}"]
        ref = golden[f"logits_{i}"]
        pos = golden[f"logit_positions_{i}"]
        logits, _ = jit_prefill(model32, jnp.asarray(ids)[None], jnp.array([len(ids)]),
                                CacheConfig.bf16(capacity=128), all_logits=True)
        got = np.asarray(logits[0, pos])
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)


def test_decode_logits_on_bf16_cache_match_transformers(model32, golden):
    """Prompt minus its last 3 tokens through prefill, those 3 through decode_step.

    The bf16 cache rounds K/V to 8 mantissa bits (relative 2^-9), which moves
    logits of magnitude ~30 by a few hundredths: tolerance 0.15, argmax equal.
    """
    for i in range(3):
        ids = golden[f"ids_{i}"]
        ref = golden[f"logits_{i}"]
        pos = list(golden[f"logit_positions_{i}"])
        assert pos == [len(ids) - 3, len(ids) - 2, len(ids) - 1]
        n0 = len(ids) - 3
        logits, cache = prefill(model32, jnp.asarray(ids[:n0])[None], jnp.array([n0]),
                                CacheConfig.bf16(capacity=128))
        outs = []
        for t in ids[n0:]:
            logits, cache = jit_decode_step(model32, cache, jnp.array([t]), backend="reference")
            outs.append(np.asarray(logits[0]))
        got = np.stack(outs)
        np.testing.assert_allclose(got, ref, rtol=0, atol=0.15)
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_transformers(model32, golden, ckpt):
    """32 greedy tokens on the bf16 cache equal transformers' greedy tokens.

    Teacher-forced along transformers' continuation, our argmax must agree at
    every one of the 32 steps whose top-2 margin there exceeds 0.1 (a near-tie
    may flip under a ~0.05 logit difference); free-running generation must
    reproduce the continuation up to its first near-tie.
    """
    prompts = [list(golden[f"ids_{i}"]) for i in range(3)]
    gen = generate(model32, prompts, CacheConfig.bf16(capacity=128), max_new_tokens=32,
                   backend="reference")
    for i in range(3):
        ref = golden[f"greedy_{i}"][:32]
        margin = golden[f"greedy_margin_{i}"][:32]
        decided = margin >= 0.1
        ids = prompts[i]
        logits, cache = prefill(model32, jnp.asarray(ids)[None], jnp.array([len(ids)]),
                                CacheConfig.bf16(capacity=128))
        forced = [int(jnp.argmax(logits[0]))]
        for t in ref[:-1]:
            logits, cache = jit_decode_step(model32, cache, jnp.array([t]), backend="reference")
            forced.append(int(jnp.argmax(logits[0])))
        forced = np.array(forced)
        assert decided.sum() >= 29
        np.testing.assert_array_equal(forced[decided], ref[decided])
        tie = np.flatnonzero(~decided)
        upto = int(tie[0]) if len(tie) else 32
        np.testing.assert_array_equal(gen.tokens[i, :upto], ref[:upto])
    assert "Paris" in ckpt.tokenizer.decode(gen.tokens[0, :3].tolist())


# a question about the prompt's own context, long enough that a group flushes at prefill
CAPITALS = ("Paris is the capital and largest city of France. The city is known for the Eiffel "
            "Tower, the Louvre museum and its cafes. Berlin is the capital of Germany, and Madrid "
            "is the capital of Spain. Rome, the capital of Italy, is famous for its ancient "
            "history. Question: What is the capital of France? Answer: The capital of France is")


def test_innerq_cache_generation_is_coherent(ckpt):
    """The bf16 model on the 2-bit InnerQ cache answers a question about its own context,
    the context quantized: 74 prompt tokens, of which the first group of 32 after the sink
    is stored as 2-bit codes before the first answer token is drawn."""
    model = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    ids = ckpt.tokenizer.encode(CAPITALS).ids
    cfg = CacheConfig.innerq(recent=32, group_size=32, capacity=256)
    assert len(ids) > cfg.sink + cfg.recent + cfg.group_size  # a group flushes at prefill
    gen = generate(model, [ids], cfg, max_new_tokens=8, backend="reference")
    assert int(gen.cache.region_sizes().quantized[0]) >= 32  # tokens really quantized
    assert "Paris" in ckpt.tokenizer.decode(gen.tokens[0, :4].tolist())


def test_folded_recommended_cache_on_the_real_model(model32, ckpt):
    """SmolLM2-135M's real weights (float32) on the recommended layout with its 2-bit codes
    in use: generate's folded weights (the default) give the unfolded run's greedy tokens
    (up to a near-tie) and its margins within the cache's rounding, and the answer is right.
    (The two runs' values differ by float32 summation order before the cache rounds them;
    one on a rounding boundary lands on the other side, up to a code step of its group,
    as in test_sharding.py: measured 0.011 at most, within 5e-2.)"""
    ids = ckpt.tokenizer.encode(CAPITALS).ids
    cfg = CacheConfig.recommended(sink=4, recent=32, capacity=256)
    assert len(ids) > cfg.sink + cfg.recent + cfg.group_size  # a group flushes at prefill
    kw = dict(max_new_tokens=12, backend="reference", record_margins=True)
    folded = generate(model32, [ids], cfg, **kw)
    plain = generate(model32, [ids], cfg, fold_values=False, **kw)
    assert int(folded.cache.region_sizes().quantized[0]) >= 32
    tie = np.flatnonzero(plain.margins[0] < 1e-2)
    upto = int(tie[0]) + 1 if tie.size else 12  # identical through the first near-tie
    np.testing.assert_array_equal(folded.tokens[0, :upto], plain.tokens[0, :upto])
    np.testing.assert_allclose(folded.margins[0, :upto], plain.margins[0, :upto], atol=5e-2)
    assert "Paris" in ckpt.tokenizer.decode(folded.tokens[0, :4].tolist())


# ------------------------------------------------------------- tiny random model
TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
                   tie_embeddings=False)


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    return Llama(TINY, nnx.Rngs(3), dtype=jnp.float32)


@pytest.mark.parametrize("cfg", [CacheConfig.bf16(capacity=128),
                                 CacheConfig.innerq(bits=4, group_size=16, recent=16, capacity=128)])
def test_decode_equals_prefill_over_full_sequence(tiny, cfg):
    """Teacher-forced decode logits equal a full prefill (bf16: within storage rounding)."""
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 97, size=(2, 60)).astype(np.int32)
    full, _ = prefill(tiny, jnp.asarray(toks), jnp.array([60, 60]), cfg, all_logits=True)
    _, cache = prefill(tiny, jnp.asarray(toks[:, :20]), jnp.array([20, 20]), cfg)
    got = []
    for t in range(20, 60):
        logits, cache = jit_decode_step(tiny, cache, jnp.asarray(toks[:, t]), backend="reference")
        got.append(np.asarray(logits))
    got = np.stack(got, 1)
    ref = np.asarray(full[:, 20:])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    if cfg.kind == "bf16":
        assert err < 2e-2
    else:  # 4-bit keys/values once tokens leave the window: close, not equal
        assert int(cache.region_sizes().quantized[0]) > 0
        assert err < 0.2 and np.mean(got.argmax(-1) == ref.argmax(-1)) > 0.8, err
    assert jit_decode_step._cache_size() >= 1


def test_bound_step_equals_the_module_step(tiny):
    """DecodeStep (the model's arrays bound once) gives jit_decode_step's logits and cache
    bit for bit, donates the cache, compiles once for a loop, runs greedy steps in one
    device loop as single steps would, and keeps a snapshot: a change to the model after
    binding does not reach it."""
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=96)
    rng = np.random.default_rng(5)
    prompts = jnp.asarray(rng.integers(0, 97, size=(2, 40)), jnp.int32)
    lengths = jnp.array([40, 23])
    step = DecodeStep(tiny, backend="reference")
    _, ca = prefill(tiny, prompts, lengths, cfg)
    _, cb = prefill(tiny, prompts, lengths, cfg)
    toks = rng.integers(0, 97, size=(20, 2))
    for t in toks:  # 20 steps: groups flush on the way (each cache owns its buffers, so
        old = cb     # donating one deletes nothing of the other or of the caller's lengths)
        la, ca = jit_decode_step(tiny, ca, jnp.asarray(t, jnp.int32), backend="reference")
        lb, cb = step(cb, jnp.asarray(t, jnp.int32))
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert int(cb.region_sizes().quantized[0]) > 0
    for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(cb), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert old.lengths.is_deleted() and not lengths.is_deleted()  # donated; the input kept
    assert step._jitted._cache_size() == 1
    # greedy: the same steps in one device loop, each fed the previous step's argmax
    tok = jnp.asarray(toks[0], jnp.int32)
    chosen, cg = step.greedy(jax.tree.map(jnp.copy, cb), tok, 4)
    want, cm = [], jax.tree.map(jnp.copy, cb)
    for _ in range(4):
        logits, cm = step(cm, tok)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        want.append(np.asarray(tok))
    np.testing.assert_array_equal(np.asarray(chosen), np.stack(want, axis=1))
    for a, b in zip(jax.tree.leaves(cg), jax.tree.leaves(cm), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        step.greedy(cm, tok, 0)
    # a snapshot: the bound step keeps the arrays it was given
    from flax import nnx

    fresh = Llama(TINY, nnx.Rngs(3), dtype=jnp.float32)
    bound = DecodeStep(fresh, backend="reference")
    tok = jnp.asarray(toks[0], jnp.int32)
    first, _ = bound(jax.tree.map(jnp.copy, cb), tok)
    fresh.lm_head[...] = jnp.zeros_like(fresh.lm_head[...])
    again, _ = bound(jax.tree.map(jnp.copy, cb), tok)
    rebound, _ = DecodeStep(fresh, backend="reference")(jax.tree.map(jnp.copy, cb), tok)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    assert np.abs(np.asarray(first)).max() > 0 and not np.asarray(rebound).any()


def test_ragged_batch_equals_single_prompts(tiny):
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=128)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (5, 37, 20)]
    batch = generate(tiny, prompts, cfg, max_new_tokens=30, backend="reference")
    # a fixed prompt shape (pad_to) changes nothing but the padding
    padded = generate(tiny, prompts, cfg, max_new_tokens=30, backend="reference", pad_to=48)
    np.testing.assert_array_equal(padded.tokens, batch.tokens)
    for i, p in enumerate(prompts):  # (one prompt shape: one compile for the three)
        one = generate(tiny, [p], cfg, max_new_tokens=30, backend="reference", pad_to=48)
        np.testing.assert_array_equal(batch.tokens[i], one.tokens[0])
    with pytest.raises(ValueError, match="pad_to=20 must be an int >= the longest prompt"):
        generate(tiny, prompts, cfg, max_new_tokens=30, pad_to=20)


def test_sampling_options(tiny):
    cfg = CacheConfig.bf16(capacity=64)
    p = [[1, 2, 3, 4]]
    greedy = generate(tiny, p, cfg, max_new_tokens=10).tokens
    k1 = generate(tiny, p, cfg, max_new_tokens=10, sampling=Sampling(1.0, top_k=1, seed=5)).tokens
    np.testing.assert_array_equal(greedy, k1)  # top-k 1 is greedy
    a = generate(tiny, p, cfg, max_new_tokens=10, sampling=Sampling(1.5, top_p=0.9, seed=7)).tokens
    b = generate(tiny, p, cfg, max_new_tokens=10, sampling=Sampling(1.5, top_p=0.9, seed=7)).tokens
    c = generate(tiny, p, cfg, max_new_tokens=10, sampling=Sampling(1.5, top_p=0.9, seed=8)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_repetition_penalty_equals_a_step_by_step_reference(tiny):
    """Sampling(repetition_penalty=p): every token already in a sequence (its prompt's valid
    tokens, then each generated one) has its logit divided by p where positive, multiplied
    where negative, before the choice. Greedy generation equals a host loop over the
    model's own prefill and decode steps that applies the penalty in float64 numpy from its
    own record of each sequence's tokens (ragged prompts with repeats: padding is not a
    seen token); penalty 1 is plain greedy, and a strong penalty changes the text."""
    cfg = CacheConfig.bf16(capacity=64)
    prompts = [[5, 9, 5, 9, 5], [7, 7, 3, 2, 7, 11, 40, 3, 1]]
    new, p = 12, 2.5
    got = generate(tiny, prompts, cfg, max_new_tokens=new,
                   sampling=Sampling(repetition_penalty=p)).tokens
    T = max(len(q) for q in prompts)
    toks = np.zeros((2, T), np.int32)
    for b, q in enumerate(prompts):
        toks[b, :len(q)] = q
    logits, cache = jit_prefill(tiny, jnp.asarray(toks), jnp.asarray([len(q) for q in prompts]),
                                cfg)
    seen = [set(q) for q in prompts]
    want = np.zeros((2, new), np.int32)
    for i in range(new):
        x = np.asarray(logits, np.float64)
        for b in range(2):
            idx = sorted(seen[b])
            x[b, idx] = np.where(x[b, idx] > 0, x[b, idx] / p, x[b, idx] * p)
        tok = x.argmax(axis=-1).astype(np.int32)
        want[:, i] = tok
        for b in range(2):
            seen[b].add(int(tok[b]))
        if i < new - 1:
            logits, cache = jit_decode_step(tiny, cache, jnp.asarray(tok))
    np.testing.assert_array_equal(got, want)
    greedy = generate(tiny, prompts, cfg, max_new_tokens=new).tokens
    one = generate(tiny, prompts, cfg, max_new_tokens=new,
                   sampling=Sampling(repetition_penalty=1.0)).tokens
    np.testing.assert_array_equal(one, greedy)
    assert not np.array_equal(got, greedy)
    for bad in (0.0, -1.2, float("nan"), float("inf"), True, "1.2"):
        with pytest.raises(ValueError, match="repetition_penalty"):
            Sampling(repetition_penalty=bad)


def test_margins_are_each_tokens_lead_over_the_runner_up(tiny):
    """record_margins: the first token's margin is the top-2 gap of the prefill logits
    (computed here apart, in float64), every later one is positive and finite while the
    sequence runs, NaN after its stop; the tokens are those of a run without margins
    (and without the stop token) up to the stop."""
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=96)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (9, 30)]
    plain = generate(tiny, prompts, cfg, max_new_tokens=20)
    eos = int(plain.tokens[0, 5])
    gen = generate(tiny, prompts, cfg, max_new_tokens=20, record_margins=True, eos_ids=(eos,))
    assert plain.margins is None
    for i in range(2):  # the same tokens up to each sequence's stop
        n = gen.lengths[i]
        np.testing.assert_array_equal(gen.tokens[i, :n], plain.tokens[i, :n])
    tokens = np.zeros((2, 30), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    logits, _ = jit_prefill(tiny, jnp.asarray(tokens), jnp.asarray([9, 30]), cfg)
    top = np.sort(np.asarray(logits, np.float64), axis=-1)[:, -2:]
    np.testing.assert_allclose(gen.margins[:, 0], top[:, 1] - top[:, 0], rtol=1e-5, atol=1e-6)
    for i in range(2):
        n = gen.lengths[i]
        assert np.all(np.isfinite(gen.margins[i, :n])) and np.all(gen.margins[i, :n] >= 0)
        assert np.all(np.isnan(gen.margins[i, n:]))
    assert gen.lengths[0] <= 6 < 20


def test_eos_stops_each_sequence(tiny):
    cfg = CacheConfig.bf16(capacity=64)
    p = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(tiny, p, cfg, max_new_tokens=12)
    eos = int(free.tokens[0, 3])
    stopped = generate(tiny, p, cfg, max_new_tokens=12, eos_ids=(eos,))
    first = int(np.flatnonzero(free.tokens[0] == eos)[0])
    assert stopped.lengths[0] == first + 1
    assert np.all(stopped.tokens[0, first + 1 :] == 0)


def test_capacity_checked_before_the_loop(tiny):
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=64)
    with pytest.raises(ValueError, match="cache capacity is 64"):
        generate(tiny, [[1] * 40], cfg, max_new_tokens=30)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[]], cfg)


def test_last_token_never_enters_the_cache(tiny):
    """The final token's logits are never used, so it is never appended: at the documented
    minimum capacity (prompt + new - 1) nothing overflows, the tokens are those of a roomy
    cache, and the stream still sees every token once."""
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=64)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 97, size=40).tolist(), rng.integers(0, 97, size=11).tolist()]
    seen = []
    gen = generate(tiny, prompts, cfg, max_new_tokens=25, backend="reference",
                   stream=lambda i, tok, done: seen.append((int(i), np.asarray(tok).tolist())))
    assert gen.cache.lengths.tolist() == [64, 35]
    assert gen.cache.overflow.tolist() == [False, False]
    roomy = generate(tiny, prompts, cfg.replace(capacity=128), max_new_tokens=25,
                     backend="reference")
    np.testing.assert_array_equal(gen.tokens, roomy.tokens)
    assert gen.lengths.tolist() == [25, 25]
    assert [i for i, _ in seen] == list(range(25))
    np.testing.assert_array_equal(np.array([t for _, t in seen]).T, gen.tokens)


def test_non_llama_config_rejected():
    from transformers import LlamaConfig

    c = LlamaConfig()
    c.model_type = "mistral"
    with pytest.raises(ValueError, match="not a Llama model"):
        ModelConfig.from_hf(c)
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, rope_type="dynamic")


def test_llama3_rope_scaling():
    """Llama 3.x scaling: short wavelengths kept, long ones divided by the factor,
    the band between interpolated smoothly (Meta's published formula)."""
    import math

    from transformers import LlamaConfig

    from models.llama import rope_frequencies

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_type == "llama3" and cfg.rope_factor == 8.0 and cfg.head_dim == 128
    ours = rope_frequencies(cfg).astype(np.float64)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    wl = 2 * math.pi / base
    want = []
    for f, w in zip(base, wl):
        if w < 8192 / 4.0:
            want.append(f)
        elif w > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            smooth = (8192 / w - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    assert (ours < base).any() and (ours == base.astype(np.float32)).any()


def test_decode_step_is_pure(tiny):
    cfg = CacheConfig.innerq(group_size=16, recent=16, capacity=64)
    _, cache = prefill(tiny, jnp.ones((1, 8), jnp.int32), jnp.array([8]), cfg)
    before = jax.tree.map(np.asarray, cache)
    decode_step(tiny, cache, jnp.array([3]), backend="reference")
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
        np.testing.assert_array_equal(a, np.asarray(b))


# ------------------------------------------------- the value rotation folded into weights
def _sylvester(D):
    h = np.array([[1.0]])
    for _ in range(int(np.log2(D))):
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / np.sqrt(D)


@pytest.mark.parametrize("signs", [False, True])
def test_folded_value_rotation_is_the_same_model(tiny, signs):
    """fold_value_rotation: W_v M and M^T W_o per head (checked in float64 against a
    Hadamard built here), and the folded model's prefill and decode logits equal the
    unfolded model's over the same rotating cache (f32 weights: rounding only), its cache
    holds the same values, and the unfolded model continues the folded model's cache."""
    from innerq_jax.cache import rotation_signs
    from models.llama import fold_value_rotation

    cfg = CacheConfig.recommended(group_size=16, sink=4, recent=16, capacity=128,
                                  rotation_signs=signs, rotation_seed=7)
    folded = fold_value_rotation(tiny, cfg)
    assert tiny.value_fold is None and folded.value_fold == (7 if signs else -1)
    c, D = TINY, TINY.head_dim
    r = c.num_heads // c.num_kv_heads
    h = _sylvester(D)
    for i, (a, b) in enumerate(zip(tiny.layers, folded.layers, strict=True)):
        s = rotation_signs(cfg, i, 1, c.num_kv_heads, D)
        s = np.ones((c.num_kv_heads, D)) if s is None else np.asarray(s[0], np.float64)
        m = s[:, :, None] * h[None]  # diag(s) H per kv head
        qkv_a, qkv_b = (np.asarray(x.attn.qkv[...], np.float64) for x in (a, b))
        want_v = np.einsum("ehd,hdf->ehf", qkv_a[:, :, r + 1], m)
        np.testing.assert_allclose(qkv_b[:, :, r + 1], want_v, atol=1e-6)
        np.testing.assert_array_equal(qkv_b[:, :, : r + 1], qkv_a[:, :, : r + 1])  # q, k kept
        o_a = np.asarray(a.attn.o[...], np.float64).reshape(c.num_kv_heads, r, D, -1)
        o_b = np.asarray(b.attn.o[...], np.float64).reshape(c.num_kv_heads, r, D, -1)
        np.testing.assert_allclose(o_b, np.einsum("hfd,hrfe->hrde", m, o_a), atol=1e-6)
    assert np.abs(np.asarray(folded.layers[0].attn.o[...]) -
                  np.asarray(tiny.layers[0].attn.o[...])).max() > 1e-2  # really changed
    rng = np.random.default_rng(11)
    toks = jnp.asarray(rng.integers(0, 97, size=(2, 70)), jnp.int32)
    lengths = jnp.array([40, 27])
    la, ca = prefill(tiny, toks[:, :40], lengths, cfg)
    lb, cb = prefill(folded, toks[:, :40], lengths, cfg)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=2e-5)
    assert cb.config == cfg  # an ordinary cache of the config asked for
    for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(cb.layers[0].sink_v, np.float32),
                               np.asarray(ca.layers[0].sink_v, np.float32), atol=1e-2)
    cc = jax.tree.map(jnp.copy, cb)
    for t in range(40, 70):  # 30 steps: groups flush from the window into the 2-bit codes
        xa, ca = jit_decode_step(tiny, ca, toks[:, t], backend="reference")
        xb, cb = jit_decode_step(folded, cb, toks[:, t], backend="reference")
        xc, cc = jit_decode_step(tiny, cc, toks[:, t], backend="reference")
        np.testing.assert_allclose(np.asarray(xb), np.asarray(xa), atol=2e-3)
        np.testing.assert_allclose(np.asarray(xc), np.asarray(xa), atol=2e-3)
    assert int(cb.region_sizes().quantized[1]) > 0


def test_folded_model_refuses_other_caches(tiny):
    from models.llama import fold_value_rotation

    cfg = CacheConfig.recommended(group_size=16, recent=16, capacity=96)
    folded = fold_value_rotation(tiny, cfg)
    toks, n = jnp.ones((1, 8), jnp.int32), jnp.array([8])
    for other in (CacheConfig.innerq(group_size=16, recent=16, capacity=96),
                  CacheConfig.bf16(capacity=96), cfg.replace(rotation="keys"),
                  cfg.replace(rotation_signs=True)):
        with pytest.raises(ValueError, match="folds a value rotation into its weights"):
            prefill(folded, toks, n, other)
    _, cache = prefill(tiny, toks, n, cfg.replace(rotation_signs=True))
    with pytest.raises(ValueError, match="must rotate values with the same signs"):
        decode_step(folded, cache, jnp.array([3]), backend="reference")
    with pytest.raises(ValueError, match="already folds"):
        fold_value_rotation(folded, cfg)
    with pytest.raises(ValueError, match="needs a cache that rotates values"):
        fold_value_rotation(tiny, cfg.replace(rotation="keys"))


def test_generate_and_bound_step_fold_the_value_rotation(tiny):
    """generate and DecodeStep fold by themselves for a value-rotating cache: the same
    tokens and near-equal margins as unfolded (f32), the step's weights carry the fold
    (only qkv and o are new arrays), and its traced step has two Hadamard products per
    layer fewer (the value's on the write, the output's in the finish)."""
    cfg = CacheConfig.recommended(group_size=16, sink=4, recent=16, capacity=128)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 97, 40).tolist(), rng.integers(0, 97, 29).tolist()]
    a = generate(tiny, prompts, cfg, max_new_tokens=24, backend="reference",
                 record_margins=True)
    b = generate(tiny, prompts, cfg, max_new_tokens=24, backend="reference",
                 record_margins=True, fold_values=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.margins, b.margins, atol=1e-3)
    assert a.cache.config == cfg
    step, plain = DecodeStep(tiny, backend="reference"), DecodeStep(
        tiny, backend="reference", fold_values=False)
    params = step.params_for(cfg)
    assert step.params_for(cfg) is params  # folded once, kept
    changed = [p.shape for p, q in zip(params, step.params, strict=True)
               if p.unsafe_buffer_pointer() != q.unsafe_buffer_pointer()]
    assert sorted(changed) == sorted([TINY_QKV, TINY_O] * TINY.num_layers)
    assert step.params_for(CacheConfig.innerq(group_size=16, recent=16, capacity=128)) \
        is step.params
    toks = jnp.asarray(rng.integers(0, 97, size=(2, 40)), jnp.int32)
    _, c1 = prefill(tiny, toks, jnp.array([40, 31]), cfg)
    c2 = jax.tree.map(jnp.copy, c1)

    def dots(s, cache):
        text = s.lower(cache, toks[:, 0]).as_text()
        return text.count("stablehlo.dot_general")

    assert dots(plain, c1) - dots(step, c1) == 2 * TINY.num_layers
    for t in range(12):
        l1, c1 = step(c1, toks[:, t])
        l2, c2 = plain(c2, toks[:, t])
        np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=2e-3)
    # a model folded already is stepped as it is (not folded twice)
    from models.llama import fold_value_rotation

    pre = DecodeStep(fold_value_rotation(tiny, cfg), backend="reference")
    assert pre.params_for(cfg) is pre.params
    l3, _ = pre(jax.tree.map(jnp.copy, c2), toks[:, 0])
    l2, _ = plain(c2, toks[:, 0])
    np.testing.assert_allclose(np.asarray(l3), np.asarray(l2), atol=2e-3)


TINY_QKV = (TINY.hidden_size, TINY.num_kv_heads, TINY.num_heads // TINY.num_kv_heads + 2,
            TINY.head_dim)
TINY_O = (TINY.num_heads * TINY.head_dim, TINY.hidden_size)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the fused kernels")
def test_folded_step_on_gpu_kernels():
    """On the GPU's kernels (the cache write and the fused attention, which then skip the
    value rotation and its 16-row merge): the folded step's logits equal the unfolded
    step's over the recommended cache, groups flushing on the way."""
    from flax import nnx

    mc = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=64, tie_embeddings=False)
    m = Llama(mc, nnx.Rngs(4), dtype=jnp.float32)
    cfg = CacheConfig.recommended(capacity=512)
    rng = np.random.default_rng(6)
    toks = jnp.asarray(rng.integers(0, 97, size=(3, 260)), jnp.int32)
    lengths = jnp.array([200, 137, 180])
    _, c1 = prefill(m, toks[:, :200], lengths, cfg)
    c2 = jax.tree.map(jnp.copy, c1)
    step, plain = DecodeStep(m), DecodeStep(m, fold_values=False)
    for t in range(200, 260):
        l1, c1 = step(c1, toks[:, t])
        l2, c2 = plain(c2, toks[:, t])
        np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=5e-3)
    assert int(c1.region_sizes().quantized[1]) > 0

"""Jit-compiled generation: prefill, then a ``lax.while_loop`` of decode steps.

The whole loop is one compiled program (no Python loop per token). Streaming
is a host callback per step, only when a callback is given. The last token is
recorded but never appended (its logits would not be used), so a prompt and
``max_new_tokens`` need prompt + max_new_tokens - 1 cache slots; that is checked
before the loop starts (a ``ValueError``, never a silent overwrite).
"""

from __future__ import annotations

import functools
import time
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from innerq_jax import CacheConfig
from innerq_jax.config import is_int
from innerq_jax.sharding import DATA, check_divisible
from models.llama import Llama, decode_step, fold_value_rotation, prefill


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters;
    ``repetition_penalty`` p != 1 scales the logit of every token already in the sequence
    (its prompt and what it generated so far) before the choice: divided by p where
    positive, multiplied by p where negative (p > 1 discourages repeats; 1 disables it)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        p = self.repetition_penalty
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (
                math.isfinite(p) and p > 0):
            raise ValueError(f"repetition_penalty={p!r} must be a finite number > 0 "
                             "(1 disables it)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an int")


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits [B, V] with the repetition penalty applied where ``seen`` [B, V] (the tokens
    already in each sequence): divided by ``penalty`` where positive, else multiplied."""
    if penalty == 1:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] f32 -> token ids [B] (the repetition penalty is the caller's:
    :func:`penalize`)."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1:
        srt = jnp.sort(x, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass < top_p
        keep = (cum - jax.nn.softmax(srt, axis=-1)) < s.top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@dataclass
class Generation:
    tokens: np.ndarray  # [B, max_new_tokens] generated ids (after a stop: pad)
    lengths: np.ndarray  # [B] tokens generated per sequence, the stop token included
    cache: object  # the final KVCache (every token but the last generated one)
    compile_s: float = 0.0  # compiling the prefill + decode loop (once per shape and config)
    run_s: float = 0.0  # running it, up to the tokens on the host
    # [B, max_new_tokens] float32 with record_margins: the top logit minus the second
    # one at each generated token (how near a tie each greedy choice was), NaN where
    # no token was generated; else None
    margins: np.ndarray | None = None


@functools.partial(
    jax.jit,
    static_argnames=("cache_config", "max_new_tokens", "sampling", "eos_ids", "backend",
                     "stream", "mesh", "record_margins", "fold_values"),
)
def _generate(model, tokens, lengths, cache_config, max_new_tokens, sampling, eos_ids,
              backend, stream, mesh=None, record_margins=False, fold_values=True):
    B = tokens.shape[0]
    if fold_values and cache_config.rotate_values and model.value_fold is None:
        # once per call, before the loop: no value rotation in any step's cache write or
        # attention (models.llama.fold_value_rotation)
        model = fold_value_rotation(model, cache_config)
    logits, cache = prefill(model, tokens, lengths, cache_config, mesh=mesh)
    rows = jnp.arange(B)
    penalty = sampling.repetition_penalty
    if penalty != 1:  # the tokens in each sequence: its prompt, then each one it generates
        valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        seen = jnp.zeros(logits.shape, jnp.int32).at[rows[:, None], tokens].add(
            valid.astype(jnp.int32)) > 0
    else:
        seen = jnp.zeros((B, 0), bool)
    key = jax.random.PRNGKey(sampling.seed)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.zeros((B, max_new_tokens), jnp.int32)
    gaps = jnp.full((B, max_new_tokens if record_margins else 0), jnp.nan, jnp.float32)

    def gap(logits):
        if not record_margins:
            return jnp.zeros((B,), jnp.float32)
        top = jax.lax.top_k(logits.astype(jnp.float32), 2)[0]
        return top[:, 0] - top[:, 1]

    def record(i, tok, done, out, n, gaps, g):
        """Token i of every sequence not yet stopped: stored, counted, streamed."""
        out = out.at[:, i].set(jnp.where(done, 0, tok))
        if record_margins:
            gaps = gaps.at[:, i].set(jnp.where(done, jnp.nan, g))
        n = n + (~done).astype(jnp.int32)
        if stream is not None:
            jax.debug.callback(stream, i, tok, done, ordered=True)
        return out, n, done | jnp.any(tok[:, None] == eos[None, :], axis=-1), gaps

    # Token i + 1 needs token i in the cache, so the loop appends tokens 0 .. N - 2;
    # the last token's logits would never be used, so it is recorded, not appended.
    def cond(state):
        i, done = state[0], state[3]
        return (i < max_new_tokens - 1) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out, n, key, gaps, g, seen = state
        out, n, done, gaps = record(i, tok, done, out, n, gaps, g)
        logits, cache = decode_step(model, cache, tok, backend=backend, mesh=mesh)
        if penalty != 1:
            seen = seen.at[rows, tok].set(True)
        key, sub = jax.random.split(key)
        logits = penalize(logits, seen, penalty)  # (the margins: of the logits chosen from)
        return i + 1, sample(logits, sub, sampling), cache, done, out, n, key, gaps, \
            gap(logits), seen

    key, sub = jax.random.split(key)
    logits = penalize(logits, seen, penalty)
    first = sample(logits, sub, sampling)
    state = (jnp.int32(0), first, cache, jnp.zeros((B,), bool), out, jnp.zeros((B,), jnp.int32),
             key, gaps, gap(logits), seen)
    i, tok, cache, done, out, n, _, gaps, g, _ = jax.lax.while_loop(cond, body, state)

    def last(args):
        out, n, _, gaps = record(i, tok, done, *args, g)
        return out, n, gaps

    # (skipped when every sequence stopped early: then nothing is left to record)
    out, n, gaps = jax.lax.cond(jnp.all(done), lambda args: args, last, (out, n, gaps))
    return out, n, cache, gaps


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    cache_config: CacheConfig,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] = (),
    backend: str = "auto",
    stream: Callable | None = None,
    mesh: Mesh | None = None,
    pad_to: int | None = None,
    record_margins: bool = False,
    fold_values: bool = True,
) -> Generation:
    """Generates for a batch of token-id prompts of different lengths.

    The prompts are right-padded to the longest one, or to ``pad_to`` tokens when
    given (a fixed prompt shape compiles once for every batch that fits it).

    ``stream(step, tokens [B], done [B])`` is called on the host after each
    step when given (used by the CLI to print text as it comes). With a ``mesh``
    (the model placed by ``models.llama.shard_model``) the prompts are split over
    its data axis and the cache over (data, model). The loop is compiled ahead of
    the run, so ``compile_s`` and ``run_s`` are reported apart. ``record_margins``
    also returns, per generated token, its logit's lead over the runner-up. For a cache
    that rotates values (the recommended cache) the model's value and output weights carry
    the rotation during the call (``fold_values``, default; computed once per call on the
    device: ``models.llama.fold_value_rotation``; the folded copies of each layer's ``qkv``
    and ``o`` live for the call), so no step rotates values; the cache returned is the same
    kind of cache either way.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    lengths = np.array([len(p) for p in prompts], np.int32)
    # the last sampled token is never appended, so the cache must hold prompt + new - 1
    need = int(lengths.max()) + max_new_tokens - 1
    if need > cache_config.capacity:
        raise ValueError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) needs "
            f"{need} cache slots but the cache capacity is {cache_config.capacity}; raise the "
            "capacity or lower max_new_tokens"
        )
    if need > model.cfg.max_positions:
        raise ValueError(f"{need} positions exceed the model's context of {model.cfg.max_positions}")
    T = int(lengths.max())
    if pad_to is not None:
        if not is_int(pad_to) or pad_to < T:
            raise ValueError(f"pad_to={pad_to!r} must be an int >= the longest prompt ({T})")
        T = int(pad_to)
        if T > cache_config.capacity:
            raise ValueError(f"pad_to={T} exceeds the cache capacity {cache_config.capacity}")
    tokens = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        check_divisible(mesh, len(prompts), model.cfg.num_kv_heads)
        tokens = jax.device_put(tokens, NamedSharding(mesh, P(DATA)))
        lengths = jax.device_put(lengths, NamedSharding(mesh, P(DATA)))
    t0 = time.perf_counter()
    compiled = _generate.lower(model, tokens, lengths, cache_config, max_new_tokens, sampling,
                               tuple(eos_ids), backend, stream, mesh,
                               bool(record_margins), bool(fold_values)).compile()
    t1 = time.perf_counter()
    out, n, cache, gaps = compiled(model, tokens, lengths)
    out, n = np.asarray(out), np.asarray(n)
    return Generation(out, n, cache, compile_s=t1 - t0, run_s=time.perf_counter() - t1,
                      margins=np.asarray(gaps) if record_margins else None)

"""Sharded against single-device decode, on 8 forced host devices (run by test_sharding.py).

Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=8 set
before jax starts; prints one JSON object with a result per (mesh, cache).
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from innerq_jax import CacheConfig
from innerq_jax.sharding import (
    bytes_per_device,
    cache_shardings,
    check_divisible,
    make_mesh,
    split_factor,
)
from models.llama import (DecodeStep, Llama, ModelConfig, jit_decode_step, jit_prefill,
                          shard_model)

# kv heads divide every model axis used; untied LM head so it is split by vocabulary
MC = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=16, num_kv_heads=8, head_dim=64, tie_embeddings=False)
B, STEPS = 8, 32
CONFIGS = {
    "bf16": CacheConfig.bf16(capacity=128),
    "innerq": CacheConfig.innerq(capacity=128, recent=32),  # groups flush during the steps
    "outerq": CacheConfig.outerq(capacity=128, recent=32),
    # randomized Hadamard signs per (layer, kv head), fp8 key scales, key groups of 16:
    # with one kv head per device, each device must see its own head's signs
    "signs": CacheConfig.innerq_h(capacity=128, recent=32, rotation_signs=True,
                                  key_group_size=16, key_scale_dtype="float8_e4m3fn"),
    # the recommended layout with signs, stepped by DecodeStep on a mesh: the value rotation
    # folded into the sharded weights (each kv head's own signs), against the unfolded
    # single-device run
    "folded": CacheConfig.recommended(capacity=128, sink=4, recent=32, rotation_signs=True),
}
MESHES = [(1, 8), (2, 4), (8, 1)]
MESHES_OF = {"signs": [(1, 8)], "folded": [(2, 4)]}


def run(model, cfg, tokens, lengths, mesh, forced=None, bound=False):
    """Prefill, then STEPS decode steps fed greedy tokens (or ``forced`` ones); the logits,
    their argmax, the final cache and the compiled step's optimized HLO. One compiled
    step takes prefill's cache and every step's: a compiled step refuses arguments whose
    shardings differ from the ones it was compiled for, so this also checks that the
    step compiles once on a mesh. ``bound``: the steps through DecodeStep (which folds a
    value rotation into the weights), its folded weights checked to keep their shardings."""
    logits, cache = jit_prefill(model, tokens, lengths, cfg, mesh=mesh)
    out = [np.asarray(logits)]
    # compiled once, and its text read from the same executable (a second lower().compile()
    # would compile the step again)
    if bound:
        ds = DecodeStep(model, mesh=mesh)
        params = ds.params_for(cfg)
        assert params is not ds.params, "DecodeStep did not fold the value rotation"
        for p, q in zip(params, ds.params, strict=True):
            assert p.sharding.is_equivalent_to(q.sharding, q.ndim), (p.shape, p.sharding)
        compiled = ds.lower(cache, jnp.zeros((B,), jnp.int32)).compile()
        step = lambda _, c, t: compiled(params, c, t)  # noqa: E731
        step.as_text = compiled.as_text
    else:
        step = jit_decode_step.lower(model, cache, jnp.zeros((B,), jnp.int32),
                                     mesh=mesh).compile()
    for i in range(STEPS):
        tok = jnp.argmax(logits, -1).astype(jnp.int32) if forced is None else forced[i]
        logits, cache = step(model, cache, jnp.asarray(tok))
        out.append(np.asarray(logits))
    logits = np.stack(out)  # [STEPS + 1, B, V]
    return logits, logits.argmax(-1).astype(np.int32), cache, step.as_text()


def collectives(hlo: str) -> dict:
    ops = {}
    for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        ops[op] = len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo))
    return ops


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="", help="kind:DxM,... (default: every kind on its meshes)")
    wanted = set(filter(None, ap.parse_args().cases.split(",")))
    known = {f"{k}:{d}x{m}" for k in CONFIGS for d, m in MESHES_OF.get(k, MESHES)}
    if wanted - known:
        ap.error(f"unknown cases {sorted(wanted - known)}; cases are {sorted(known)}")
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, MC.vocab_size, (B, 60)), jnp.int32)
    lengths = jnp.asarray([60, 47, 33, 5, 60, 1, 36, 59], jnp.int32)  # ragged, one inside the sink
    # float32 weights, so sharded and single-device differ only in summation order
    base = Llama(MC, nnx.Rngs(0), dtype=jnp.float32)
    results = {}
    for kind, cfg in CONFIGS.items():
        meshes = [(d, m) for d, m in MESHES_OF.get(kind, MESHES)
                  if not wanted or f"{kind}:{d}x{m}" in wanted]
        if not meshes:
            continue
        ref_logits, ref_tokens, _, _ = run(base, cfg, tokens, lengths, None)
        for d, m in meshes:
            mesh = make_mesh(d, m)
            model = shard_model(Llama(MC, nnx.Rngs(0), dtype=jnp.float32), mesh)
            # fed the single-device run's greedy tokens, so a near-tie decided the
            # other way by summation order cannot send the two runs apart
            logits, toks, cache, hlo = run(model, cfg, tokens, lengths, mesh, forced=ref_tokens,
                                           bound=kind == "folded")
            top2 = np.sort(ref_logits, axis=-1)[..., -2:]
            tie = (top2[..., 1] - top2[..., 0]) < 1e-3 * np.abs(ref_logits).max()
            per_dev = bytes_per_device(cache)
            expect = sum(leaf.nbytes // split_factor(mesh, leaf) for leaf in jax.tree.leaves(cache))
            want = cache_shardings(cache, mesh)
            shardings_ok = all(
                leaf.sharding.is_equivalent_to(w, leaf.ndim)
                for leaf, w in zip(jax.tree.leaves(cache), jax.tree.leaves(want)) if leaf.size)
            results[f"{kind}:{d}x{m}"] = dict(
                max_logit_diff=float(np.abs(logits - ref_logits).max()),
                logit_scale=float(np.abs(ref_logits).max()),
                tokens_equal=bool(np.all((toks == ref_tokens) | tie)),
                near_ties=int(tie.sum()),
                bytes_per_device=sorted(set(per_dev.values())), expected_bytes=int(expect),
                devices=len(per_dev), total_bytes=int(cache.total_nbytes()),
                cache_leaves_sharded=bool(shardings_ok),
                collectives=collectives(hlo),
            )
            print(kind, d, m, results[f"{kind}:{d}x{m}"]["max_logit_diff"], file=sys.stderr)
    errors = {}
    for name, (d, m, batch, heads) in {"batch": (8, 1, 12, 8), "heads": (1, 8, 8, 12)}.items():
        try:
            check_divisible(make_mesh(d, m), batch, heads)
            errors[name] = ""
        except ValueError as err:
            errors[name] = str(err)
    print(json.dumps(dict(results=results, errors=errors)))


if __name__ == "__main__":
    main()

"""Location-free fingerprints of the Mosaic GPU decode kernel's IR (and of its Triton
epilogue's), on the CPU.

A refactor of the kernel's Python (a helper shared, a loop moved) that leaves every
fingerprint unchanged builds the same kernel, so the GPU records of the earlier commit
still hold for it. The IR is taken as Mosaic GPU hands it to serialization, printed
without source locations (which name files and lines), for a fixed set of
configurations (InnerQ default and its structural options, the e4m3 keys, OuterQ at 2 and 4
bits), the
dump file name (a per-process counter) left out.

    PYTHONPATH=$PWD python3 benchmarks/kernel_ir.py          # one line per configuration
    # compare two commits: run it in a worktree of each and diff the output
"""

from __future__ import annotations

import contextlib
import hashlib
import re

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration as triton_registration
from jax.experimental.mosaic.gpu import core

from innerq_jax import CacheConfig, KVCache
from pallas_kernels import mgpu_decode as md

# (name, config, head_dim, query heads, kv heads, batch, kernel options)
CASES = (
    ("innerq2-D128", CacheConfig.innerq(capacity=32768), 128, 32, 8, 8, {}),
    ("innerq2-D128-inline", CacheConfig.innerq(capacity=32768), 128, 32, 8, 8,
     dict(wgmma="inline")),
    ("innerq4-G64-D64", CacheConfig.innerq(bits=4, group_size=64, capacity=4096), 64, 9, 3, 2, {}),
    ("innerq2-tailzero-parts2", CacheConfig.innerq(capacity=4096), 128, 8, 2, 2,
     dict(tail="zero", chain_parts=2)),
    ("innerq2-D128-e4m3", CacheConfig.innerq(capacity=32768), 128, 32, 8, 8,
     dict(key_format="e4m3x2")),
    ("innerq2-e4m3-parts2", CacheConfig.innerq(capacity=4096), 128, 8, 2, 2,
     dict(key_format="e4m3x2", chain_parts=2)),
    ("innerq2-D128-lazy", CacheConfig.innerq(capacity=32768), 128, 32, 8, 8,
     dict(rescale="lazy", explicit_barriers=True)),
    ("outerq2-D128", CacheConfig.outerq(capacity=32768), 128, 32, 8, 8, {}),
    ("outerq4-G64-D64", CacheConfig.outerq(bits=4, group_size=64, capacity=4096), 64, 9, 3, 2,
     {}),
)


@contextlib.contextmanager
def _captured():
    """Collects the text (no locations) of every Mosaic GPU module serialized inside."""
    texts, orig = [], core._run_serde_pass

    def spy(module, *args, **kwargs):
        if kwargs.get("serialize"):
            text = module.operation.get_asm(enable_debug_info=False)
            # the dump file name counts the process's kernels: not part of the kernel
            texts.append(re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', "", text))
        return orig(module, *args, **kwargs)

    core._run_serde_pass = spy
    try:
        yield texts
    finally:
        core._run_serde_pass = orig


def fingerprint(cfg: CacheConfig, D: int, Hq: int, Hkv: int, B: int, options: dict) -> str:
    """sha256 (16 hex digits) of the kernel's IR for this configuration, lowered for CUDA."""
    layer = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D).layer(0))
    qp = jax.ShapeDtypeStruct((B, Hkv, Hq // Hkv, D), jnp.float32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    fn = jax.jit(lambda q, lay, n: md.mgpu_decode_attention(
        q, lay, n, cfg, num_splits=6, windows="xla", query="xla", **options))
    with _captured() as texts:
        fn.trace(qp, layer, lens).lower(lowering_platforms=("cuda",))
    if len(texts) != 1:
        raise RuntimeError(f"expected one Mosaic GPU kernel, lowered {len(texts)}")
    return hashlib.sha256(texts[0].encode()).hexdigest()[:16]


# the Mosaic op's Triton epilogue (windows and merge) and its merge-only launch:
# (name, config, head_dim, query heads, kv heads, batch, splits, channel blocks)
EPILOGUE_CASES = (
    ("epilogue-innerq2-B1-NS49", CacheConfig.innerq(capacity=4096), 128, 32, 8, 1, 49, 8),
    ("epilogue-innerq2-B8-NS6", CacheConfig.innerq(capacity=4096), 128, 32, 8, 8, 6, 4),
    ("epilogue-innerq4-G64-D64", CacheConfig.innerq(bits=4, group_size=64, capacity=4096), 64,
     9, 3, 2, 5, 2),
    ("epilogue-outerq2", CacheConfig.outerq(capacity=4096), 128, 32, 8, 8, 6, 4),
    ("epilogue-mha-G64", CacheConfig.innerq(group_size=64, capacity=4096), 128, 8, 8, 2, 7, 8),
    # values rotated: also the epilogue that undoes the rotation itself (finish_values)
    ("epilogue-recommended-B1-NS49", CacheConfig.recommended(capacity=4096), 128, 32, 8, 1, 49,
     8),
)


@contextlib.contextmanager
def _captured_triton():
    """Collects the text (no locations) of every Triton module Pallas lowers inside."""
    texts, orig = [], triton_registration.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = orig(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield texts
    finally:
        triton_registration.lowering.lower_jaxpr_to_triton_module = orig


def epilogue_fingerprints(cfg: CacheConfig, D: int, Hq: int, Hkv: int, B: int, NS: int,
                          n_dc: int) -> dict[str, str]:
    """{"epilogue": ..., "merge": ...} (and "finish" where the cache rotates its values):
    sha256 (16 hex digits) of the Triton IR of ``windows_and_merge``, of ``merge_partials``
    and of ``windows_and_merge(finish_values=True)`` for these partials, lowered for an
    H200."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from pallas_kernels.mgpu_epilogue import merge_partials, windows_and_merge
    from pallas_kernels.mgpu_geometry import Geometry

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))
    cache = jax.eval_shape(lambda: KVCache.create(cfg, 1, B, Hkv, D))
    layer, r = cache.layer(0), Hq // Hkv
    geo = Geometry(cfg.bits, cfg.group_size, D, r, 128,
                   layout="outerq" if cfg.kind == "outerq" else "innerq")
    qp = jax.ShapeDtypeStruct((B, Hkv, r, D), jnp.float32)
    o = jax.ShapeDtypeStruct((B, Hkv, NS, D, geo.NV), jnp.float32)
    ml = jax.ShapeDtypeStruct((B, Hkv, NS, 2, geo.NV), jnp.float32)
    fns = {"epilogue": lambda q, lay, n, o_, ml_: windows_and_merge(
               q, lay, n, cfg, o_, ml_, geo, n_channel_blocks=n_dc),
           "merge": lambda q, lay, n, o_, ml_: merge_partials(o_, ml_, geo, r,
                                                              n_channel_blocks=n_dc)}
    if cfg.rotate_values:
        fns["finish"] = lambda q, lay, n, o_, ml_: windows_and_merge(
            q, lay, n, cfg, o_, ml_, geo, n_channel_blocks=n_dc, out_dtype=jnp.bfloat16,
            finish_values=True)
    out = {}
    for label, fn in fns.items():
        with _captured_triton() as texts, use_abstract_mesh(mesh):
            jax.jit(fn).trace(qp, layer, cache.lengths, o, ml).lower(
                lowering_platforms=("cuda",))
        if len(texts) != 1:
            raise RuntimeError(f"expected one Triton kernel, lowered {len(texts)}")
        out[label] = hashlib.sha256(texts[0].encode()).hexdigest()[:16]
    return out


def main() -> None:
    for name, cfg, D, Hq, Hkv, B, options in CASES:
        print(f"{name:26s} {fingerprint(cfg, D, Hq, Hkv, B, options)}", flush=True)
    for name, *case in EPILOGUE_CASES:
        for label, fp in epilogue_fingerprints(*case).items():
            print(f"{name + ' ' + label:34s} {fp}", flush=True)


if __name__ == "__main__":
    main()

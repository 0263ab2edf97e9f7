"""Location-free fingerprints of the Mosaic GPU decode kernel's IR, on the CPU.

A refactor of the kernel's Python (a helper shared, a loop moved) that leaves every
fingerprint unchanged builds the same kernel, so the GPU records of the earlier commit
still hold for it. The IR is taken as Mosaic GPU hands it to serialization, printed
without source locations (which name files and lines), for a fixed set of
configurations (InnerQ default and its structural options, OuterQ at 2 and 4 bits), the
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


def main() -> None:
    for name, cfg, D, Hq, Hkv, B, options in CASES:
        print(f"{name:26s} {fingerprint(cfg, D, Hq, Hkv, B, options)}", flush=True)


if __name__ == "__main__":
    main()

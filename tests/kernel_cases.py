"""Random caches shared by the kernel test modules (Triton, Mosaic GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax import KVCache


def kv_with_outliers(rng, B, H, T, D):
    """Keys with channel offsets and a few outlier channels, values normal."""
    k = rng.standard_normal((1, B, H, T, D)) + 1.5 * rng.standard_normal(D)
    for c in rng.choice(D, 3, replace=False):
        k[..., c] *= 8.0
    v = rng.standard_normal((1, B, H, T, D))
    v[..., rng.integers(D)] *= 4.0
    return k, v


def cache_after_appends(cfg, B, H, D, lengths, appends=0, seed=0):
    """Prefill to ``lengths - appends`` then append one token at a time.

    Appends run through the cache's own flush logic: a sequence whose recent
    window reaches R + G during the appends moves a group into the quantized region.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    assert lengths.min() >= appends, "every sequence receives every appended token"
    T = int(lengths.max())
    k, v = kv_with_outliers(rng, B, H, T, D)
    pre = np.maximum(lengths - appends, 0)
    Tp = max(int(pre.max()), 1)
    cache = KVCache.from_prefill(cfg, jnp.asarray(k[..., :Tp, :], jnp.float32),
                                 jnp.asarray(v[..., :Tp, :], jnp.float32), pre)
    step = jax.jit(lambda c, kk, vv: c.append(kk, vv))
    for i in range(appends):
        idx = np.minimum(pre + i, T - 1)
        kn = np.stack([k[0, b, :, idx[b]] for b in range(B)])[None]
        vn = np.stack([v[0, b, :, idx[b]] for b in range(B)])[None]
        cache = step(cache, jnp.asarray(kn, jnp.float32), jnp.asarray(vn, jnp.float32))
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    return cache


def abstract_h200():
    """A one-device abstract mesh of an H200: under ``use_abstract_mesh`` Pallas' Triton
    lowering runs on the CPU (it needs a GPU's compute capability, which this supplies)."""
    from jax.sharding import AbstractDevice, AbstractMesh

    return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))


def cuda_ops(f, *args):
    """The StableHLO op names of ``f(*args)`` exported for CUDA under an abstract H200 (Pallas'
    Triton lowering runs on the CPU there), and the module's text."""
    import re

    from jax import export
    from jax.sharding import use_abstract_mesh

    with use_abstract_mesh(abstract_h200()):
        text = export.export(f, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args).mlir_module()
    return re.findall(r"stablehlo\.([a-z_]+)", text), text

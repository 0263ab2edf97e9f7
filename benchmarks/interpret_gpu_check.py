"""Why the fused Triton kernel in interpret mode misses 1e-2 on a GPU (compiled, it passes).

Runs one small random InnerQ cache through ``quantized_decode_attention(interpret=True)``
and the reference ``quantized_attention_core`` on the default device, each under jax's
default matmul precision and under "highest", and prints every pairwise relative error
(the compiled kernel too, where a GPU can compile it). On a CPU every figure is small.

    PYTHONPATH=$PWD python3 benchmarks/interpret_gpu_check.py
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax import CacheConfig, KVCache
from innerq_jax.reference import prepare_query, quantized_attention_core
from pallas_kernels.decode import quantized_decode_attention


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    cfg = CacheConfig.innerq(capacity=1024)
    B, H, r, D, T = 2, 2, 4, 128, 900
    key = jax.random.PRNGKey(0)
    k = jax.random.normal(key, (1, B, H, T, D), jnp.float32)
    v = jax.random.normal(jax.random.fold_in(key, 1), (1, B, H, T, D), jnp.float32)
    cache = KVCache.from_prefill(cfg, k, v, np.array([T, 300]))
    layer = cache.layer(0)
    q = jax.random.normal(jax.random.fold_in(key, 2), (B, H * r, D), jnp.float32)
    qp = prepare_query(q, layer, cfg, 1 / math.sqrt(D))
    outs = {}
    for prec in ("default", "highest"):
        with jax.default_matmul_precision(None if prec == "default" else prec):
            outs[f"reference/{prec}"] = quantized_attention_core(qp, layer, cache.lengths, cfg)
            outs[f"interpret/{prec}"] = quantized_decode_attention(
                qp, layer, cache.lengths, cfg, interpret=True)
    for ns in (1, 2):  # one split: no partial of another program is read by the merge
        outs[f"interpret/splits{ns}"] = quantized_decode_attention(
            qp, layer, cache.lengths, cfg, interpret=True, num_splits=ns)
    if jax.default_backend() == "gpu":
        outs["compiled"] = quantized_decode_attention(qp, layer, cache.lengths, cfg)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            print(f"  {a:20s} vs {b:20s} rel err {_rel(outs[a], outs[b]):.2e}")
    ref = outs["reference/highest"]
    for name in ("interpret/default", "interpret/splits1"):
        err = [[_rel(outs[name][b, h], ref[b, h]) for h in range(H)] for b in range(B)]
        print(f"  {name} per (sequence, kv head) vs reference/highest: "
              + " ".join(f"{e:.1e}" for row in err for e in row)
              + f"; NaN {int(np.isnan(np.asarray(outs[name])).sum())}")


if __name__ == "__main__":
    main()

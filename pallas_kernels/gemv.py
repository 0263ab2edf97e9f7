"""A vector times a matrix, as one Pallas (Triton) kernel: a probe, not on any model path.

At one sequence every projection of a decode step is x [K] times a weight W [K, N]. XLA's
GPU simplifier rewrites such a dot of under 10M weight elements (every projection of
SmolLM2-135M) as an elementwise multiply and a reduction, and runs them as two kernels
with the weight-sized product written and read back between them
(``benchmarks/KERNEL_NOTES.md``, rounds 24-25; this XLA takes no option to stop it, and
two-row products measured no faster). This kernel reads W once: each program owns
``block_n`` output columns and walks K in steps of ``block_k`` rows, multiplying the
step's rows by x's slice and summing them in float32 (one scale-free FMA per weight
element; no product written). ``benchmarks/gemv_probe.py`` times it against XLA's product
at the default model's five projection shapes; the model uses XLA's until that says
otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(x_ref, w_ref, o_ref, *, K: int, block_k: int, block_n: int):
    # x_ref [K] (whole), w_ref [K, N] (whole), o_ref [block_n]: this program's columns
    j = pl.program_id(0)
    cols = pl.ds(j * block_n, block_n)

    def body(i, acc):
        rows = pl.ds(i * block_k, block_k)
        xk = x_ref[rows].astype(jnp.float32)  # [block_k]
        wk = w_ref[rows, cols].astype(jnp.float32)  # [block_k, block_n]
        return acc + jnp.sum(xk[:, None] * wk, axis=0)

    acc = jax.lax.fori_loop(0, K // block_k, body, jnp.zeros((block_n,), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.lru_cache(maxsize=None)
def _build(K: int, N: int, dtype, block_k: int, block_n: int, num_warps: int,
           interpret: bool):
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
    return pl.pallas_call(
        functools.partial(_kernel, K=K, block_k=block_k, block_n=block_n),
        out_shape=jax.ShapeDtypeStruct((N,), dtype),
        grid=(N // block_n,),
        out_specs=pl.BlockSpec((block_n,), lambda j: (j,)),
        interpret=interpret,
        name="innerq_gemv",
        **kw,
    )


def gemv(x: jax.Array, w: jax.Array, *, block_k: int = 64, block_n: int = 64,
         num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """x [K] @ w [K, N] -> [N] in x's dtype (float32 accumulation).

    ``block_k`` and ``block_n`` (powers of two, the Triton backend's block sizes) must
    divide K and N; every projection of SmolLM2-135M and Llama-3-8B divides by 64.
    """
    if x.ndim != 1 or w.ndim != 2 or w.shape[0] != x.shape[0]:
        raise ValueError(f"gemv needs x [K] and w [K, N]; got x {x.shape}, w {w.shape}")
    K, N = w.shape
    for name, b, n in (("block_k", block_k, K), ("block_n", block_n, N)):
        if not isinstance(b, int) or b < 1 or b & (b - 1) or n % b:
            raise ValueError(f"{name}={b!r} must be a power of two dividing {n} "
                             f"(x {x.shape}, w {w.shape})")
    if not jnp.issubdtype(x.dtype, jnp.floating) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"gemv needs floating x and w; got {x.dtype}, {w.dtype}")
    return _build(K, N, jnp.dtype(x.dtype), block_k, block_n, num_warps, interpret)(x, w)


__all__ = ["gemv"]

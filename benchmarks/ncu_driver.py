"""A small program for Nsight Compute: builds a random InnerQ cache at one shape and calls
the fused decode kernels (Triton, and Mosaic GPU on Hopper) a few times, printing a line
after each step (under ncu the benchmark script died with a segfault and no trace)."""

import argparse
import json
import math

import jax
import jax.numpy as jnp


def say(s):
    print(s, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--kernels", default="triton,mgpu")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--save", default="", help="build the inputs and save them here (.npz), run nothing")
    ap.add_argument("--load", default="", help="take the inputs from --save's file")
    ap.add_argument("--options", default="{}",
                    help="JSON options for the Mosaic GPU kernel (mgpu_decode_attention)")
    a = ap.parse_args()
    from innerq_jax import CacheConfig
    from innerq_jax.cache import QuantLayer
    from innerq_jax.reference import prepare_query, quantized_attention_core

    say(f"devices {jax.devices()}")
    B, T, H, r, D = a.B, a.T, 8, 4, 128
    cfg = CacheConfig.innerq(bits=2, group_size=32, capacity=T)
    key = jax.random.PRNGKey(0)
    lengths = jnp.full((B,), T, jnp.int32)
    prefill = jax.jit(QuantLayer.prefill, static_argnames=("cfg",))
    core = jax.jit(quantized_attention_core, static_argnames=("cfg",))
    if a.load:
        import numpy as np

        kv = jax.ShapeDtypeStruct((B, H, T, D), jnp.float32)
        treedef = jax.tree.structure(jax.eval_shape(
            lambda k, v, n: QuantLayer.prefill(k, v, n, cfg), kv, kv, lengths))
        z = np.load(a.load)
        shapes = jax.tree.leaves(jax.eval_shape(
            lambda k, v, n: QuantLayer.prefill(k, v, n, cfg), kv, kv, lengths))
        # npz keeps bf16 as raw bytes: view them back as the leaf's dtype
        layer = jax.tree.unflatten(treedef, [
            jnp.asarray(z[f"l{i}"].view(sd.dtype).reshape(sd.shape)) for i, sd in enumerate(shapes)])
        qp, ref = jnp.asarray(z["qp"]), jnp.asarray(z["ref"])
        say("loaded")
    else:
        k = jax.random.normal(key, (B, H, T, D), jnp.float32) + 0.5
        v = jax.random.normal(jax.random.fold_in(key, 1), (B, H, T, D), jnp.float32)
        say("random k, v")
        layer = prefill(k, v, lengths, cfg=cfg)
        jax.block_until_ready(layer)
        del k, v
        say("prefilled")
        q = jax.random.normal(jax.random.fold_in(key, 2), (B, H * r, D), jnp.float32)
        qp = prepare_query(q, layer, cfg, 1 / math.sqrt(D))
        ref = core(qp, layer, lengths, cfg=cfg)
        jax.block_until_ready(ref)
        say("reference")
    if a.save:
        import numpy as np

        leaves = {f"l{i}": np.asarray(x).view(np.uint8) for i, x in enumerate(jax.tree.leaves(layer))}
        np.savez(a.save, qp=np.asarray(qp), ref=np.asarray(ref), **leaves)
        say(f"saved {a.save}")
        return
    fns = {}
    if "triton" in a.kernels:
        from pallas_kernels.decode import quantized_decode_attention
        fns["triton"] = jax.jit(lambda qp, layer, n: quantized_decode_attention(qp, layer, n, cfg))
    if "mgpu" in a.kernels:
        from pallas_kernels.mgpu_decode import mgpu_decode_attention
        opts = json.loads(a.options)
        fns["mgpu"] = jax.jit(lambda qp, layer, n: mgpu_decode_attention(qp, layer, n, cfg, **opts))
    for name, fn in fns.items():
        lowered = fn.lower(qp, layer, lengths)
        say(f"{name}: lowered")
        compiled = lowered.compile()
        say(f"{name}: compiled")
        for i in range(a.calls):
            out = compiled(qp, layer, lengths)
            jax.block_until_ready(out)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            say(f"{name}: call {i} rel err {err:.2e}")


if __name__ == "__main__":
    main()

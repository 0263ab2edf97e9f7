"""The cache over a device mesh: batch on the ``data`` axis, kv heads on ``model``.

Every cache leaf is laid out [B, Hkv, ...] (codes, scales, zero-points, masks,
sink and recent windows, key centre and scale), so one rule shards them all:
B on ``data`` and Hkv on ``model``; lengths and overflow flags are [B] and go
on ``data``. Attention never needs another device's heads (the GQA query heads
of a kv head stay with it), so :func:`shard_attention` runs the per-layer
append and decode attention under ``shard_map`` on each device's local batch
and heads, with no communication. Weights are sharded by the model (see
``models.sharding``), which puts the two all-reduces of a Megatron layer on
the ``model`` axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(data: int = 1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (default: local ones)."""
    for name, n in (("data", data), ("model", model)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mesh axis {name}={n!r} must be a positive int")
    devices = list(jax.local_devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} available")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def default_mesh(num_kv_heads: int, batch: int, devices: Sequence | None = None) -> Mesh:
    """Uses as many devices as divide the work: model | Hkv, data | batch.

    The model axis takes the largest device count dividing the kv heads, the
    data axis the largest count of the rest dividing the batch.
    """
    n = len(jax.local_devices() if devices is None else devices)
    model = max(m for m in range(1, n + 1) if num_kv_heads % m == 0 and n % m == 0)
    data = max(d for d in range(1, n // model + 1) if batch % d == 0 and (n // model) % d == 0)
    return make_mesh(data, model, devices)


def parse_mesh(spec: str, devices: Sequence | None = None) -> Mesh:
    """``"data=2,model=4"`` (either may be left out, meaning 1) -> Mesh."""
    sizes = {DATA: 1, MODEL: 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise ValueError(f"mesh {spec!r}: expected 'data=D,model=M' with positive ints, "
                             f"got {part!r}")
        sizes[name.strip()] = int(value)
    return make_mesh(sizes[DATA], sizes[MODEL], devices)


def check_divisible(mesh: Mesh, batch: int, num_kv_heads: int) -> None:
    """Clear errors when the batch or the kv heads do not split over the mesh."""
    d, m = mesh.shape[DATA], mesh.shape[MODEL]
    if batch % d:
        ok = [x for x in range(1, batch + 1) if batch % x == 0]
        raise ValueError(f"batch {batch} does not split over the mesh's data axis of {d} "
                         f"devices; data must divide the batch: one of {ok}")
    if num_kv_heads % m:
        ok = [x for x in range(1, num_kv_heads + 1) if num_kv_heads % x == 0]
        raise ValueError(f"{num_kv_heads} kv heads do not split over the mesh's model axis of "
                         f"{m} devices; model must divide the kv heads: one of {ok}")


def _leaf_spec(x) -> P:
    # [B] -> data; [B, Hkv, ...] -> data, model (every layer leaf of every cache kind)
    return P(DATA) if x.ndim == 1 else P(DATA, MODEL)


def cache_specs(cache):
    """PartitionSpecs of every leaf of a KVCache (or of one layer's cache)."""
    return jax.tree.map(_leaf_spec, cache)


def cache_shardings(cache, mesh: Mesh):
    """The ``NamedSharding`` of every leaf of ``cache`` (a KVCache or its eval_shape)."""
    check_divisible(mesh, cache.batch, cache.num_kv_heads)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache))


def shard_cache(cache, mesh: Mesh):
    """``cache`` placed on the mesh (a copy only where a leaf is not already there)."""
    return jax.device_put(cache, cache_shardings(cache, mesh))


def bytes_per_device(cache) -> dict:
    """Bytes each device holds of a placed cache: {device id: bytes}."""
    out: dict = {}
    for leaf in jax.tree.leaves(cache):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def split_factor(mesh: Mesh, leaf) -> int:
    """How many ways ``leaf`` is split over the mesh by :func:`cache_specs`."""
    spec = _leaf_spec(leaf)
    return math.prod(mesh.shape[a] for a in spec if a is not None)


def on_mesh(fn: Callable, mesh: Mesh | None, *args):
    """Runs ``fn`` on each device's share of ``args`` and of its results.

    Every array in and out is [B] or [B, heads, ...] (queries, new keys and
    values, layer caches, lengths, attention outputs), split as
    :func:`cache_specs` says: each device sees its own sequences and kv heads,
    with their GQA query heads, and nothing crosses devices. Without a mesh
    ``fn`` runs as it is.
    """
    if mesh is None:
        return fn(*args)
    # Zero-size leaves (a cache without sink tokens has [B, Hkv, 0, D] windows)
    # hold nothing to split, and XLA's CPU compiler crashes on them inside
    # shard_map (jax 0.11.2): they stay outside and are rebuilt on each side.
    leaves, tree = jax.tree.flatten(args)
    outs = jax.eval_shape(fn, *args)
    out_leaves, out_tree = jax.tree.flatten(outs)

    def local(x):
        spec = _leaf_spec(x)
        return tuple(n // (mesh.shape[spec[i]] if i < len(spec) else 1)
                     for i, n in enumerate(x.shape))

    def inner(*live):
        it = iter(live)
        full = [jnp.zeros(local(x), x.dtype) if x.size == 0 else next(it) for x in leaves]
        res = jax.tree.leaves(fn(*jax.tree.unflatten(tree, full)))
        return [r for r, o in zip(res, out_leaves) if o.size]

    live_in = [x for x in leaves if x.size]
    live_out = [o for o in out_leaves if o.size]
    # Pallas kernels inside carry no varying-axis annotations, hence check_vma off.
    res = iter(jax.shard_map(inner, mesh=mesh, in_specs=tuple(_leaf_spec(x) for x in live_in),
                             out_specs=[_leaf_spec(o) for o in live_out],
                             check_vma=False)(*live_in))
    return jax.tree.unflatten(out_tree, [next(res) if o.size else jnp.zeros(o.shape, o.dtype)
                                         for o in out_leaves])

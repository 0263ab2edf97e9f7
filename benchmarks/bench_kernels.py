"""Kernel benchmark: fused quantized decode attention against bf16 / int8 peers.

Run on whatever backend is present (one call builds, checks and times everything):

    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --out $OUT            # suite for the backend
    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --suite sweep --out $OUT  # GPU tunables

``--suite auto`` (the default) runs ``full`` on a GPU, ``tpu`` on a TPU and the small
``cpu`` set on a CPU. Every file carries one flat ``rows`` list in a versioned schema
(``ROW_SCHEMA``): device kind, backend, jax version, the shape, the variant, its time,
the bytes it must read and its bandwidth in every row; ``meta`` adds the device's
measured copy bandwidth and, where jax knows it (TPU), the spec HBM bandwidth.
``benchmarks/compare.py`` reads these files (and the older ``runs``-only ones).

Protocol (docs benchmarks.md): random caches (normal keys with channel
offsets and outlier channels, never zeros) built through QuantLayer.prefill;
every variant is checked against its reference before it is timed (a mismatch
or NaN aborts the run); timing runs ``n_sets`` calls inside one jitted program,
each on its own copy of the inputs (distinct buffers, together larger than the
50 MB L2), one sync at the end, median of several repetitions. Bytes are the
bytes each variant must read (codes, scales, zero-points, windows, q; kernel
(a) also writes its scores, (b) reads p); GB/s = bytes / median time.
Writes kernels_<suite>.json and a PNG plot under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from innerq_jax.attention import decode_attention_layer, quantized_path
from innerq_jax.cache import QuantLayer
from innerq_jax.config import CacheConfig
from innerq_jax.layout import region_sizes
from innerq_jax.reference import finish_output, prepare_query, quantized_attention_core
from pallas_kernels.decode import quantized_decode_attention
from pallas_kernels.mgpu_decode import mgpu_decode_attention
from pallas_kernels.key_scores import key_scores_reference, quantized_key_scores
from pallas_kernels.tpu_decode import quantized_decode_attention_tpu
from pallas_kernels.value_sum import quantized_value_sum, value_sum_reference

# compare.py sits beside this script: the variant names and families are defined once there
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import BF16_PEERS, variant_family  # noqa: E402

L2_BYTES = 50 * 2**20
TOL_QUANT = 1e-2  # see tests/test_kernels.py: bf16 MMA operands
# OuterQ folds the scale into the bf16 operand (q*s, p*s) and its keys are not
# centred (KIVI preset: key_norm none), so the common q.mu part of every score is
# large and its rounding does not cancel: ~1.2e-2 at 32k tokens (InnerQ: 5e-3)
TOL_OUTERQ = 2e-2
TOL_BF16 = 2e-2  # bf16 peers against an f32 softmax over the same bf16 cache


# ------------------------------------------------------------------ schema
ROW_SCHEMA = "innerq-jax/kernel-bench-row/1"


def roofline_ms(nbytes, copy_gbps):
    """The time to move ``nbytes`` once at the copy rate measured in the same run (ms)."""
    if not nbytes or not copy_gbps:
        return None
    return nbytes / (copy_gbps * 1e6)


def flat_rows(meta, runs) -> list[dict]:
    """One row per (shape, variant), every row self-describing (ROW_SCHEMA)."""
    rows = []
    for run in runs:
        if run.get("ablation", "full") != "full" or "results" not in run:
            continue  # ablated kernels and trace records are not variants' timings
        sh = run["shape"]
        for name, res in run["results"].items():
            rows.append({
                "schema": ROW_SCHEMA,
                "device_kind": meta["device_kind"], "backend": meta.get("backend", meta["platform"]),
                "jax": meta["jax"],
                "shape": sh["label"], "B": sh["B"], "T": sh["T"], "Hq": sh["Hq"], "Hkv": sh["Hkv"],
                "D": sh["D"], "bits": sh["bits"], "G": sh["G"],
                "variant": name, "family": variant_family(name), "bf16_peer": name in BF16_PEERS,
                "ms": res.get("ms"), "min_ms": res.get("min_ms"), "max_ms": res.get("max_ms"),
                "bytes": res.get("bytes"), "gbps": res.get("gbps"), "rel_err": res.get("rel_err"),
                "error": res.get("error"), "ms_one_program": res.get("ms_one_program"),
                "roofline_ms": roofline_ms(res.get("bytes"), meta.get("copy_gbps")),
            })
    return rows


def measure_copy_gbps(nbytes=None, calls=20, reps=5) -> float:
    """Device memory bandwidth for a read + write of every byte (an in-place, donated
    update, so no allocation is timed): the roofline of a bandwidth-bound kernel.
    256 MB on an accelerator, 64 MB on a CPU; median of reps."""
    nbytes = nbytes or (64 if jax.default_backend() == "cpu" else 256) * 2**20
    step = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)
    x = step(jax.random.uniform(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32))
    ts = []
    for _ in range(reps):
        jax.block_until_ready(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            x = step(x)
        jax.block_until_ready(x)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes * calls / statistics.median(ts) / 1e9


def spec_hbm_gbps():
    """The chip's HBM bandwidth from jax's TPU table (None elsewhere)."""
    if jax.default_backend() != "tpu":
        return None
    try:
        from jax.experimental.pallas import tpu as pltpu

        info = pltpu.get_tpu_info()
        return info.mem_bw_bytes_per_second * info.num_cores / 1e9
    except Exception:  # noqa: BLE001 - an unknown chip
        return None


# ------------------------------------------------------------------ data
def _random_kv(key, B, H, T, D, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    offs = 1.5 * jax.random.normal(k2, (D,))
    outl = jnp.where(jax.random.uniform(k3, (D,)) < 3.0 / D, 8.0, 1.0)
    k = (jax.random.normal(k1, (B, H, T, D)) + offs) * outl
    v = jax.random.normal(k4, (B, H, T, D))
    return k.astype(dtype), v.astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(k, v, lengths, cfg):
    return QuantLayer.prefill(k, v, lengths, cfg)


def _copies(tree, n):
    """n structurally equal trees in distinct device buffers."""
    return [tree] + [jax.tree.map(lambda x: x.copy(), tree) for _ in range(n - 1)]


def _nbytes(tree):
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _rel(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        raise AssertionError("NaN/Inf in output")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------ peers
def bf16_xla(q, k, v):
    """q [B, H, r, D] f32 (softmax scale folded), k, v [B, H, T, D] bf16."""
    s = jnp.einsum("bhrd,bhtd->bhrt", q.astype(jnp.bfloat16), k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhrt,bhtd->bhrd", p.astype(jnp.bfloat16), v, preferred_element_type=jnp.float32)


def _pallas_decode_module():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decode_attention is deprecated",
                                category=DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention
    return decode_attention


def bf16_pallas(q, k, v, k_splits=16):
    """jax's Pallas Triton decode kernel (unbatched) under vmap over B and H; no transposes."""
    mod = _pallas_decode_module()
    inner = functools.partial(
        mod.decode_attn_unbatched, start_idx=None, kv_seq_len=None, sm_scale=1.0, block_h=16,
        block_k=256, k_splits=k_splits, num_warps=None, num_stages=2, grid=None,
        interpret=False, debug=False, return_residuals=False, normalize_output=True)
    f = jax.vmap(jax.vmap(lambda qq, kk, vv: inner(qq, kk, vv)))
    return f(q.astype(jnp.bfloat16), k, v).astype(jnp.float32)


def cudnn(q, k_bthd, v_bthd):
    """jax.nn.dot_product_attention(cudnn); k, v stored [B, T, H, D] (its layout)."""
    B, H, r, D = q.shape
    qq = q.reshape(B, 1, H * r, D).astype(jnp.bfloat16)
    o = jax.nn.dot_product_attention(qq, k_bthd, v_bthd, scale=1.0, implementation="cudnn")
    return o.reshape(B, H, r, D).astype(jnp.float32)


def int8_xla(q, kc, ks, vc, vs):
    """Per-token int8 (one scale per token and head), through XLA."""
    s = jnp.einsum("bhrd,bhtd->bhrt", q.astype(jnp.bfloat16), kc.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32) * ks[:, :, None, :].astype(jnp.float32)
    p = jax.nn.softmax(s, axis=-1) * vs[:, :, None, :].astype(jnp.float32)
    return jnp.einsum("bhrt,bhtd->bhrd", p.astype(jnp.bfloat16), vc.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)


def bf16_paged_tpu(q, k_pages, v_pages, lengths, page_indices, pages_per_block=8):
    """jax's Pallas TPU paged decode attention; k, v pages [Hkv, pages, page_size, D] bf16,
    filled contiguously (sequence b owns pages b*P .. b*P + P - 1)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    B, H, r, D = q.shape
    o = paged_attention(q.reshape(B, H * r, D).astype(jnp.bfloat16), k_pages, v_pages, lengths,
                        page_indices, pages_per_compute_block=pages_per_block)
    return o.reshape(B, H, r, D).astype(jnp.float32)


def _pages(x, page_size):
    """[B, H, T, D] -> [H, B*T/page_size, page_size, D] (contiguous pages)."""
    B, H, T, D = x.shape
    return jnp.swapaxes(x, 0, 1).reshape(H, B * T // page_size, page_size, D)


def _int8(x):
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = (amax / 127.0).astype(jnp.bfloat16)
    inv = jnp.where(scale > 0, 1.0 / scale.astype(jnp.float32), 0.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) * inv[..., None]), -127, 127).astype(jnp.int8), scale


def dense_reference(q, k, v):
    s = jnp.einsum("bhrd,bhtd->bhrt", q, k.astype(jnp.float32), precision="highest")
    return jnp.einsum("bhrt,bhtd->bhrd", jax.nn.softmax(s, -1), v.astype(jnp.float32),
                      precision="highest")


@functools.partial(jax.jit, static_argnames=("cfg",))
def dense_reference_quantized(qp, layer, lengths, cfg):
    """The float32 contract (``quantized_attention_core``) the quantized variants are checked
    against, computed at highest matmul precision."""
    with jax.default_matmul_precision("highest"):
        return quantized_attention_core(qp, layer, lengths, cfg)


# ------------------------------------------------------------------ timing
CALLS = 32  # kernel calls per timed program (one launch of the program, one sync)


def _multi(fn, arg_sets, n_calls=None):
    """(jitted program, its argument): ``n_calls`` (default CALLS) calls of ``fn`` in one
    program, call i on input set i % len(arg_sets) (distinct buffers) with its own copy of
    the first argument (the query), so no two calls are identical and XLA cannot merge them.

    Each call's arrays are separate arguments of the program even where calls share a
    set: given each buffer once (round 30), XLA saw the calls sharing a cache and merged
    the XLA peer's products over it, 7.5 TB/s on the H200's 4.8 (KERNEL_NOTES.md, round 30)."""
    n_calls = n_calls or CALLS
    calls = [(jax.tree.map(lambda x: x.copy(), arg_sets[i % len(arg_sets)][0]),)
             + tuple(arg_sets[i % len(arg_sets)][1:]) for i in range(n_calls)]
    return jax.jit(lambda cs: [fn(*a) for a in cs]), calls


PROGRAMS = 4  # timed programs dispatched back to back per repetition, one sync at the end
# seconds each point's program runs back to back before it is timed, so that no point is
# timed on a device idle since the point before (at a 4k-token cache the 20 timed programs
# take ~20 ms). Round 16 measured that it does not remove the spread of the short shapes:
# the same three points in the same order twice, B 1 / 4k, moved by up to 70% between the
# passes (KERNEL_NOTES.md, "Round 16")
WARM_S = 0.25


def _warm(multi, calls, seconds: float) -> int:
    """Runs the program back to back (one sync per run) for at least ``seconds``; returns
    the number of runs (at least one)."""
    runs, t0 = 0, time.perf_counter()
    while True:
        jax.block_until_ready(multi(calls))
        runs += 1
        if time.perf_counter() - t0 >= seconds:
            return runs


def _time_programs(multi, calls, reps: int, programs: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [multi(calls) for _ in range(programs)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t0) * 1e3 / (programs * len(calls)))
    return ts


def time_calls_detail(fn, arg_sets, reps, n_calls=None, programs=PROGRAMS,
                      one_program=True, warm_s: float = WARM_S) -> dict:
    """ms per call of the :func:`_multi` program: ``ms`` / ``min_ms`` / ``max_ms`` (median,
    min, max over ``reps`` repetitions) with ``programs`` runs of it dispatched back to back
    and one sync, and (``one_program``) ``ms_one_program`` (median) with one run per sync.

    The pipelined figure is the headline: a decode loop dispatches step after step, so the
    host's per-run work (taking the program's arguments, setting up its launch) overlaps
    the device's. Timed alone, one run adds that work to every call's figure: ~35-45 us per
    call at B 8 / 32k for every op alike, measured against the device's own span in the
    traces (benchmarks/KERNEL_NOTES.md, rounds 6 and 7). Before timing, the program runs
    back to back for ``warm_s`` seconds (default :data:`WARM_S`; ``warm_runs`` counts them),
    so that no point is timed on a device still idle from the point before."""
    multi, calls = _multi(fn, arg_sets, n_calls)
    warm_runs = _warm(multi, calls, warm_s)
    piped = _time_programs(multi, calls, reps, programs)
    out = dict(ms=statistics.median(piped), min_ms=min(piped), max_ms=max(piped),
               programs=programs, warm_runs=warm_runs)
    if one_program:
        out["ms_one_program"] = statistics.median(_time_programs(multi, calls, reps, 1))
    return out


def time_calls(fn, arg_sets, reps, n_calls=None, programs=PROGRAMS, warm_s: float = WARM_S):
    """(median, min, max) ms per call, pipelined as in :func:`time_calls_detail`."""
    t = time_calls_detail(fn, arg_sets, reps, n_calls, programs, one_program=False,
                          warm_s=warm_s)
    return t["ms"], t["min_ms"], t["max_ms"]


# ------------------------------------------------------------------ shapes
class Shape:
    def __init__(self, B, T, Hq=32, Hkv=8, D=128, bits=2, G=32, label=""):
        self.B, self.T, self.Hq, self.Hkv, self.D, self.bits, self.G = B, T, Hq, Hkv, D, bits, G
        self.r = Hq // Hkv
        self.label = label or f"B{B}-T{T // 1024}k-Hq{Hq}-Hkv{Hkv}-D{D}-b{bits}-G{G}"

    def cfg(self, kind, **kw):
        make = {"innerq": CacheConfig.innerq, "outerq": CacheConfig.outerq,
                "innerq-h": CacheConfig.innerq_h}[kind]
        return make(**{"bits": self.bits, "group_size": self.G, "capacity": self.T, **kw})


def _copy_budget() -> int:
    """Bytes the rotated input copies may take: 40 GB, or 40% of the device's memory
    where jax reports it (a 16 GB TPU v5e must not be asked for 40 GB)."""
    try:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
    except Exception:  # noqa: BLE001 - CPUs and some runtimes report nothing
        return 40 * 2**30
    return int(min(40 * 2**30, 0.4 * limit))


def _n_sets(read_bytes: float, copy_bytes: float) -> int:
    """Input copies to rotate: enough that one pass over them reads 6x L2 (4 to 32), and
    at least 2, within the copy budget for copies of ``copy_bytes`` each."""
    n = int(min(32, max(4, math.ceil(6 * L2_BYTES / read_bytes))))
    return int(max(2, min(n, _copy_budget() // copy_bytes)))


def run_shape(shape: Shape, variants, reps, kernel_opts, log, check=True, n_calls=None,
              warm_s: float = WARM_S):
    B, T, H, r, D = shape.B, shape.T, shape.Hkv, shape.r, shape.D
    key = jax.random.PRNGKey(B * 1000 + T)
    lengths = jnp.full((B,), T, jnp.int32)
    k, v = _random_kv(key, B, H, T, D)
    q = jax.random.normal(jax.random.fold_in(key, 7), (B, H * r, D), jnp.float32)
    results = {}

    caches = {}
    for kind in ("innerq", "outerq", "innerq-h"):
        wanted = {f"{kind}_fused", f"{kind}_tpu", f"{kind}_ref", f"{kind}_mgpu"}
        if any(x.split("@")[0] in wanted for x in variants) or (kind == "innerq" and any(
                x.startswith(("kernel_", "innerq_mgpu")) for x in variants)):
            cfg = shape.cfg(kind)
            caches[kind] = (cfg, _prefill(k, v, lengths, cfg))
    qbytes = B * H * r * D * 4
    bf16_bytes = B * H * T * D * 2 * 2 + qbytes
    quant_bytes = None
    if caches:  # the layouts store the same number of codes, scales and zeros
        cfg, layer = caches.get("innerq", next(iter(caches.values())))
        win = (layer.sink_k.nbytes + layer.recent_k.nbytes) * 2
        quant_bytes = sum(layer.k.nbytes()[f] + layer.v.nbytes()[f]
                          for f in ("codes", "scale", "zero")) + win + qbytes
    # the bf16 copies are the largest: they set the budget (~40 GB, less on smaller devices)
    n_sets = _n_sets(quant_bytes or bf16_bytes / 5, bf16_bytes)
    log(f"[{shape.label}] n_sets={n_sets} bf16 {bf16_bytes / 1e6:.0f} MB  quant "
        f"{(quant_bytes or 0) / 1e6:.0f} MB")

    def record(name, fn, arg_sets, check_fn, nbytes, extra=None, abort_on_mismatch=True):
        try:
            err = check_fn(fn(*arg_sets[0])) if check else float("nan")
            t = time_calls_detail(fn, arg_sets, reps, n_calls, warm_s=warm_s)
            med = t["ms"]
            results[name] = dict(**t, bytes=nbytes, gbps=nbytes / med / 1e6, rel_err=err,
                                 **(extra or {}))
            log(f"  {name:28s} {med:8.4f} ms  {nbytes / med / 1e6:7.0f} GB/s  err {err:.1e}"
                f"  (one run per sync: {t['ms_one_program']:.4f} ms)")
        except AssertionError as e:
            if abort_on_mismatch:
                raise SystemExit(f"MISMATCH {shape.label} {name}: {e}")
            results[name] = {"error": f"MISMATCH (not timed): {e}"[:400]}
            log(f"  {name:28s} MISMATCH, not timed: {e}")
        except Exception as e:  # noqa: BLE001 - a peer that does not run is recorded
            results[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            log(f"  {name:28s} FAILED {type(e).__name__}: {str(e)[:200]}")
            if not name.startswith(("cudnn",)):
                traceback.print_exc()

    # ---- bf16 peers (scale folded into q: the same qp as the quantized kernels use, minus sigma)
    scale = 1.0 / math.sqrt(D)
    qd = (q.reshape(B, H, r, D) * scale)
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    need_dense = any(x in variants for x in ("bf16_xla", "bf16_pallas", "cudnn"))
    if need_dense:
        ref_d = dense_reference(qd, kb, vb)

        def check_d(o):
            e = _rel(o, ref_d)
            assert e < TOL_BF16, f"rel err {e:.2e}"
            return e

        sets = _copies((qd, kb, vb), n_sets)
        if "bf16_xla" in variants:
            record("bf16_xla", bf16_xla, sets, check_d, bf16_bytes)
        if "bf16_pallas" in variants:
            record("bf16_pallas", bf16_pallas, sets, check_d, bf16_bytes)
        del sets
        if "bf16_paged_tpu" in variants:
            page = 64
            pidx = jnp.arange(B * T // page, dtype=jnp.int32).reshape(B, T // page)
            sets = _copies((qd, _pages(kb, page), _pages(vb, page), lengths, pidx), n_sets)
            record("bf16_paged_tpu", bf16_paged_tpu, sets, check_d, bf16_bytes,
                   extra={"options": {"page_size": page, "pages_per_compute_block": 8}})
            del sets
        if "cudnn" in variants:
            kt, vt = jnp.swapaxes(kb, 1, 2), jnp.swapaxes(vb, 1, 2)
            sets = _copies((qd, kt, vt), n_sets)
            record("cudnn", cudnn, sets, check_d, bf16_bytes)
            del sets, kt, vt
    if "int8_xla" in variants:
        (kc, ks), (vc, vs) = _int8(k), _int8(v)
        deq = lambda c, sc: c.astype(jnp.float32) * sc.astype(jnp.float32)[..., None]
        ref_i = dense_reference(qd, deq(kc, ks), deq(vc, vs))  # f32 over the int8 cache

        def check_i(o):
            e = _rel(o, ref_i)
            assert e < TOL_BF16, f"rel err {e:.2e}"
            return e

        sets = _copies((qd, kc, ks, vc, vs), n_sets)
        record("int8_xla", int8_xla, sets, check_i, _nbytes((kc, ks, vc, vs)) + qbytes)
        del sets

    # ---- quantized kernels ("innerq_fused@{json options}" runs one tunable point)
    for kind in ("innerq", "outerq"):
        points = [v for v in variants if v.split("@")[0] == f"{kind}_fused"]
        if not points or kind not in caches:
            continue
        cfg, layer = caches[kind]
        qp = prepare_query(q, layer, cfg, scale)
        ref = quantized_attention_core(qp, layer, lengths, cfg) if check else None

        def check_q(o, ref=ref, tol=TOL_QUANT if kind == "innerq" else TOL_OUTERQ):
            e = _rel(o, ref)
            assert e < tol, f"rel err {e:.2e}"
            return e

        sets = _copies((qp, layer, lengths), n_sets)
        for name in points:
            opts = dict(kernel_opts.get(kind, {}))
            if "@" in name:
                opts.update(json.loads(name.split("@", 1)[1]))
            fn = functools.partial(quantized_decode_attention, cfg=cfg, **opts)
            record(name, lambda qp_, layer_, len_, fn=fn: fn(qp_, layer_, len_), sets, check_q,
                   quant_bytes, extra={"options": opts})
        del sets, ref
    # ---- the TPU kernel and the plain-jnp reference path (what "auto" runs on a CPU)
    for kind in ("innerq", "outerq"):
        if kind not in caches:
            continue
        cfg, layer = caches[kind]
        qp = prepare_query(q, layer, cfg, scale)
        tol = TOL_QUANT if kind == "innerq" else TOL_OUTERQ
        ref = None
        # "innerq_tpu@{json options}" runs one tunable point (block_rows)
        names = [v for v in variants if v.split("@")[0] in (f"{kind}_tpu", f"{kind}_ref")]
        for name in names:
            if ref is None and check:
                ref = dense_reference_quantized(qp, layer, lengths, cfg)

            def check_t(o, ref=ref, tol=tol):
                e = _rel(o, ref)
                assert e < tol, f"rel err {e:.2e}"
                return e

            opts = dict(kernel_opts.get(name.split("@")[0], {}))
            if "@" in name:
                opts.update(json.loads(name.split("@", 1)[1]))
            if name.split("@")[0].endswith("_tpu"):
                fn = functools.partial(quantized_decode_attention_tpu, cfg=cfg, **opts)
            else:
                fn = functools.partial(quantized_attention_core, cfg=cfg)
            sets = _copies((qp, layer, lengths), n_sets)
            record(name, lambda qp_, layer_, len_, fn=fn: fn(qp_, layer_, len_), sets, check_t,
                   quant_bytes, extra={"options": opts})
            del sets
        del ref
    if "innerq-h_tpu" in variants and "innerq-h" in caches:
        cfg, layer = caches["innerq-h"]
        with jax.default_matmul_precision("highest"):
            ref = decode_attention_layer(q, layer, lengths, cfg, backend="reference")

        def check_ht(o):
            e = _rel(o, ref)
            assert e < TOL_QUANT, f"rel err {e:.2e}"
            return e

        fn = functools.partial(decode_attention_layer, cfg=cfg, backend="tpu")
        sets = _copies((q, layer, lengths), n_sets)
        record("innerq-h_tpu", lambda q_, l_, n_, fn=fn: fn(q_, l_, n_), sets, check_ht,
               quant_bytes, extra={"note": "rotations of q and o included"})
        del sets
    # ---- the Mosaic GPU kernel ("innerq_mgpu@{json options}" runs one tunable point;
    # "outerq_mgpu" the same kernel on the OuterQ layout); a mismatch is recorded and the
    # point is not timed (the run goes on)
    for kind in ("innerq", "outerq"):
        mgpu_points = [v for v in variants if v.split("@")[0] == f"{kind}_mgpu"]
        if not mgpu_points or kind not in caches:
            continue
        cfg, layer = caches[kind]
        qp = prepare_query(q, layer, cfg, scale)
        ref = quantized_attention_core(qp, layer, lengths, cfg) if check else None
        tol = TOL_QUANT if kind == "innerq" else TOL_OUTERQ

        def check_m(o, ref=ref, tol=tol):
            e = _rel(o, ref)
            assert e < tol, f"rel err {e:.2e}"
            return e

        sets = _copies((qp, layer, lengths), n_sets)
        for name in mgpu_points:
            opts = dict(kernel_opts.get(f"{kind}_mgpu", {}))
            if "@" in name:
                opts.update(json.loads(name.split("@", 1)[1]))
            fn = functools.partial(mgpu_decode_attention, cfg=cfg, **opts)
            record(name, lambda qp_, layer_, len_, fn=fn: fn(qp_, layer_, len_), sets, check_m,
                   quant_bytes, extra={"options": opts, "backend": "mosaic_gpu"},
                   abort_on_mismatch=False)
        del sets, ref
    # ---- InnerQ-H through the dispatch ("innerq-h_fused@{json kernel options}" one point)
    h_points = [v for v in variants if v.split("@")[0] == "innerq-h_fused"]
    if h_points and "innerq-h" in caches:
        cfg, layer = caches["innerq-h"]
        ref = decode_attention_layer(q, layer, lengths, cfg, backend="reference")

        def check_h(o):
            e = _rel(o, ref)
            assert e < TOL_QUANT, f"rel err {e:.2e}"
            return e

        sets = _copies((q, layer, lengths), n_sets)
        for name in h_points:
            opts = dict(kernel_opts.get("innerq", {}))
            if "@" in name:
                opts.update(json.loads(name.split("@", 1)[1]))
            fn = functools.partial(decode_attention_layer, cfg=cfg, backend="pallas", **opts)
            record(name, lambda q_, l_, n_, fn=fn: fn(q_, l_, n_), sets, check_h, quant_bytes,
                   extra={"note": "rotations of q and o included", "options": opts,
                          "path": quantized_path(cfg, B * H, "pallas", opts)},
                   abort_on_mismatch=False)
        del sets
    # ---- any InnerQ configuration ("cfg_fused@{CacheConfig.innerq overrides as JSON}"): a
    # candidate cache of the fidelity search timed in the same run as innerq_fused, through
    # the dispatch (rotations of q and o included), checked against the reference path.
    # "cfg_xlaprep@{...}": the same kernel with q prepared and the output finished in XLA
    # around it (the dispatch before the kernels took them in, round 10); "cfg_qkernel@{...}":
    # the dispatch with the query's rotation in the fused Triton kernel's prologue
    # "query_dtype" in the JSON is not the cache's: the dtype of the model's query heads the
    # call takes (float32 by default; "bfloat16" as a bf16 model's projection gives them)
    for name in [x for x in variants if x.split("@")[0] in CFG_VARIANTS]:
        over = json.loads(name.split("@", 1)[1]) if "@" in name else {}
        q_dtype = over.pop("query_dtype", "float32")
        if q_dtype not in QUERY_DTYPES:
            raise ValueError(f"{name}: query_dtype={q_dtype!r}; choose one of {QUERY_DTYPES}")
        q_in = q.astype(q_dtype)
        cfg = shape.cfg("innerq", **over)
        layer = _prefill(k, v, lengths, cfg)
        nbytes = sum(layer.k.nbytes()[f] + layer.v.nbytes()[f]
                     for f in ("codes", "scale", "zero"))
        nbytes += (layer.sink_k.nbytes + layer.recent_k.nbytes) * 2 + q_in.nbytes
        ref = decode_attention_layer(q_in.astype(jnp.float32), layer, lengths, cfg,
                                     backend="reference")

        # keys along T take OuterQ's key path (scales folded into bf16 operands)
        tol_c = TOL_QUANT if cfg.k_grouping == "d" else TOL_OUTERQ

        def check_c(o, ref=ref, tol=tol_c):
            e = _rel(o, ref)
            assert e < tol, f"rel err {e:.2e}"
            return e

        if name.startswith("cfg_xlaprep"):
            fn = functools.partial(_xla_prep_dispatch, cfg=cfg, scale=scale,
                                   **kernel_opts.get("innerq", {}))
        elif name.startswith("cfg_qkernel"):
            fn = functools.partial(decode_attention_layer, cfg=cfg, backend="pallas",
                                   rotate_query="kernel", **kernel_opts.get("innerq", {}))
        else:
            fn = functools.partial(decode_attention_layer, cfg=cfg, backend="pallas",
                                   **kernel_opts.get("innerq", {}))
        sets = _copies((q_in, layer, lengths), n_sets)
        record(name, lambda q_, l_, n_, fn=fn: fn(q_, l_, n_), sets, check_c, nbytes,
               extra={"config": cfg.short_name(), "note": "rotations of q and o included",
                      "path": quantized_path(cfg, layer.k_scale.shape[0]
                                             * layer.k_scale.shape[1], "pallas")},
               abort_on_mismatch=False)
        del sets, layer, ref
    if "innerq" in caches and ("kernel_a" in variants or "kernel_b" in variants):
        cfg, layer = caches["innerq"]
        qp = prepare_query(q, layer, cfg, scale)
        kb_ = sum(layer.k.nbytes()[f] for f in ("codes", "scale", "zero"))
        vb_ = sum(layer.v.nbytes()[f] for f in ("codes", "scale", "zero"))
        Tq = cfg.quant_capacity
        if "kernel_a" in variants:
            ref = key_scores_reference(qp, layer.k)

            def check_a(o):
                e = _rel(o, ref)
                assert e < TOL_QUANT, f"rel err {e:.2e}"
                return e

            sets = _copies((qp, layer.k), n_sets)
            record("kernel_a_key_scores", lambda a, b: quantized_key_scores(a, b), sets, check_a,
                   kb_ + qbytes + B * H * r * Tq * 4, extra={"note": "writes [B,H,r,Tq] f32 scores"})
            del sets, ref
        if "kernel_b" in variants:
            n = region_sizes(lengths, cfg).quantized
            p = jax.nn.softmax(jax.random.normal(key, (B, H, r, Tq)) * 2.0, axis=-1)
            ref = value_sum_reference(p, layer.v, n)

            def check_b(o):
                e = _rel(o, ref)
                assert e < TOL_QUANT, f"rel err {e:.2e}"
                return e

            sets = _copies((p, layer.v, n), n_sets)
            record("kernel_b_value_sum", lambda a, b, c: quantized_value_sum(a, b, c), sets,
                   check_b, vb_ + B * H * r * Tq * 4, extra={"note": "reads [B,H,r,Tq] f32 p"})
            del sets
    del caches, k, v
    return {"shape": vars(shape) | {"label": shape.label}, "n_sets": n_sets, "results": results}


# ------------------------------------------------------------------ suites
CFG_VARIANTS = ("cfg_fused", "cfg_xlaprep", "cfg_qkernel")
QUERY_DTYPES = ("float32", "bfloat16", "float16")  # a cfg variant's "query_dtype"


def _xla_prep_dispatch(q, layer, lengths, cfg, scale, **opts):
    """The dispatch's kernel with q prepared and the output finished by XLA around it."""
    B, H = layer.k_scale.shape[:2]
    qp = prepare_query(q, layer, cfg, scale)
    if quantized_path(cfg, B * H, "pallas", opts) == "mosaic":
        o = mgpu_decode_attention(qp, layer, lengths, cfg, **opts)
    else:
        o = quantized_decode_attention(qp, layer, lengths, cfg, **opts)
    return finish_output(o, cfg, q.dtype, layer.rot_signs)


ALL = ["bf16_xla", "bf16_pallas", "cudnn", "int8_xla", "innerq_fused", "outerq_fused",
       "innerq-h_fused", "kernel_a", "kernel_b", "innerq_mgpu", "outerq_mgpu",
       "bf16_paged_tpu", "innerq_tpu", "outerq_tpu", "innerq-h_tpu", "innerq_ref", "outerq_ref"]


def full_suite():
    """The shape suite of docs/benchmarks.md, trimmed to fit one device call.

    Every peer and variant at the two target shapes; elsewhere the fastest bf16
    peer measured there (jax's Pallas decode kernel) against the fused kernels and the
    layer's dispatch (``cfg_fused``: the path a user's call takes, query preparation in).
    """
    k = 1024
    # (tunables of both kernels: kernels_sweep.json, kernels_full.json of round 2,
    # kernels_points_*.json of round 3)
    gpu_all = [n for n in ALL if not n.endswith("_tpu")] + ["cfg_fused"]  # TPU kernels: TPU only
    rest = ["bf16_pallas", "innerq_fused", "innerq_mgpu", "cfg_fused"]
    shapes = [(Shape(8, 32 * k), gpu_all), (Shape(1, 128 * k), gpu_all)]
    for B, T in [(1, 4 * k), (1, 32 * k), (8, 4 * k), (8, 16 * k), (32, 16 * k)]:
        shapes.append((Shape(B, T), rest + ["outerq_fused"]))
    shapes.append((Shape(8, 32 * k, bits=4), rest + ["outerq_fused"]))
    shapes.append((Shape(8, 32 * k, G=64), rest))
    shapes.append((Shape(8, 8 * k, Hq=32, Hkv=32, label="MHA-B8-T8k-Hq32-Hkv32"), rest))
    shapes.append((Shape(8, 8 * k, Hq=9, Hkv=3, D=64, label="SmolLM2-B8-T8k-Hq9-Hkv3-D64"),
                   rest + ["outerq_fused"]))
    return shapes


def tpu_suite():
    """The shape suite of docs/benchmarks.md for one TPU chip: every peer at the two target
    shapes, elsewhere the fastest bf16 peers against the TPU kernels (shapes that do not
    fit the chip's HBM are recorded as failed, not fatal)."""
    k = 1024
    peers = ["bf16_xla", "bf16_paged_tpu"]
    every = peers + ["int8_xla", "innerq_tpu", "outerq_tpu", "innerq-h_tpu", "innerq_ref"]
    shapes = [(Shape(8, 32 * k), every), (Shape(1, 128 * k), every)]
    for B, T in [(1, 4 * k), (1, 32 * k), (8, 4 * k), (8, 16 * k), (32, 16 * k)]:
        shapes.append((Shape(B, T), peers + ["innerq_tpu", "outerq_tpu"]))
    shapes.append((Shape(8, 32 * k, bits=4), peers + ["innerq_tpu", "outerq_tpu"]))
    shapes.append((Shape(8, 32 * k, G=64), peers + ["innerq_tpu"]))
    shapes.append((Shape(8, 8 * k, Hq=32, Hkv=32, label="MHA-B8-T8k-Hq32-Hkv32"),
                   peers + ["innerq_tpu"]))
    shapes.append((Shape(8, 8 * k, Hq=9, Hkv=3, D=64, label="SmolLM2-B8-T8k-Hq9-Hkv3-D64"),
                   peers + ["innerq_tpu", "outerq_tpu"]))
    return shapes


def cpu_suite():
    """Small shapes for a CPU (a few minutes in all): the XLA peers against the plain-jnp
    reference path that ``backend="auto"`` runs there. No kernel is timed on a CPU (the
    Pallas interpreters check kernels, they do not time them)."""
    k = 1024
    names = ["bf16_xla", "int8_xla", "innerq_ref", "outerq_ref"]
    return [(Shape(1, 1 * k), names), (Shape(4, 2 * k), names),
            (Shape(4, 2 * k, bits=4), ["bf16_xla", "innerq_ref", "outerq_ref"]),
            (Shape(4, 2 * k, Hq=9, Hkv=3, D=64, label="SmolLM2-B4-T2k-Hq9-Hkv3-D64"), names)]


def auto_suite() -> str:
    return {"gpu": "full", "tpu": "tpu"}.get(jax.default_backend(), "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="auto",
                    choices=["auto", "full", "tpu", "cpu", "sweep", "quick", "profile", "trace",
                             "points"],
                    help="auto: full on a GPU, tpu on a TPU, cpu on a CPU")
    ap.add_argument("--calls", type=int, default=None,
                    help=f"calls per timed program (default {CALLS}; the cpu suite uses 4)")
    ap.add_argument("--points", default="[]",
                    help='points suite: JSON [[B, T, {Shape kwargs}, [variants]], ...]')
    ap.add_argument("--tag", default="", help="suffix of the output files (kernels_<suite><tag>.*)")
    ap.add_argument("--ncu", action="store_true", help="profile suite: full kernel only")
    ap.add_argument("--shapes", default="",
                    help='profile and trace suites: JSON [[B, T, {Shape kwargs}], ...] '
                         "(default B 8 / T 32k)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warm-s", type=float, default=WARM_S,
                    help="seconds each point runs back to back before it is timed")
    ap.add_argument("--options", default="{}", help="JSON {kind: kernel options}")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no timing: completes a suite a time limit cut, from its partial "
                         "JSON and files with the missing shapes (a later file's shape "
                         "replaces an earlier one's); writes kernels_<suite><tag>.{json,png}")
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    if args.suite == "auto":
        args.suite = auto_suite()
    if args.warm_s < 0:
        ap.error(f"--warm-s must be >= 0 seconds, got {args.warm_s}")
    n_calls = args.calls or (4 if args.suite == "cpu" else None)
    if (args.suite == "points") != (args.points != "[]"):
        ap.error("--points is required by --suite points and used by no other suite")
    if args.shapes:
        if args.suite not in ("profile", "trace"):
            ap.error("--shapes is used by --suite profile and --suite trace only")
        try:
            _shapes_arg(args)
        except (ValueError, TypeError) as e:
            ap.error(f"--shapes must be JSON [[B, T, {{Shape kwargs}}], ...]: {e}")
    if args.suite == "points":
        try:
            points = [(Shape(B, T, **kw), list(names)) for B, T, kw, names in json.loads(args.points)]
        except (ValueError, TypeError) as e:
            ap.error(f"--points must be JSON [[B, T, {{Shape kwargs}}, [variants]], ...]: {e}")
        bad = sorted({n for _, names in points for n in names
                      if n.split("@")[0] not in ALL + list(CFG_VARIANTS)})
        if bad:
            ap.error(f"--points: unknown variants {bad}; variants are "
                     f"{ALL + list(CFG_VARIANTS)} "
                     "(a kernel may carry options: innerq_fused@{json}, innerq_tpu@{json})")
    t_start = time.time()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    meta = {"device_kind": dev.device_kind, "platform": dev.platform, "backend": jax.default_backend(),
            "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "env": {k: v for k, v in os.environ.items() if k in ("DISABLE_MMA_V3", "XLA_FLAGS")},
            "copy_gbps": measure_copy_gbps(), "peak_hbm_gbps": spec_hbm_gbps(),
            "row_schema": ROW_SCHEMA}
    log(f"device {dev.device_kind}  backend {meta['backend']}  jax {jax.__version__}  "
        f"copy {meta['copy_gbps']:.0f} GB/s  spec HBM {meta['peak_hbm_gbps'] or '-'} GB/s")
    kernel_opts = json.loads(args.options) if args.suite not in ("profile", "trace") else {}
    runs = []
    if args.suite == "sweep":
        runs = sweep(log, args.reps)
    elif args.suite == "trace":
        runs = trace(log, args, lambda recs: _write(args, meta, {}, recs))
    elif args.suite == "profile":
        runs = profile(log, args.reps, args, lambda recs: _write(args, meta, {}, recs))
        kernel_opts = {}
    else:
        if args.suite == "points":
            shapes = points
        elif args.suite == "full":
            shapes = full_suite()
        elif args.suite == "tpu":
            shapes = tpu_suite()
        elif args.suite == "cpu":
            shapes = cpu_suite()
        else:
            shapes = [(Shape(8, 32 * 1024), ALL), (Shape(1, 128 * 1024), ALL)]
        for shape, variants in shapes:
            try:
                runs.append(run_shape(shape, variants, args.reps, kernel_opts, log,
                                      n_calls=n_calls, warm_s=args.warm_s))
            except SystemExit:
                raise
            except Exception as e:  # noqa: BLE001 - a shape that does not fit is recorded
                log(f"[{shape.label}] FAILED {type(e).__name__}: {str(e)[:300]}")
                runs.append({"shape": vars(shape) | {"label": shape.label}, "n_sets": 0,
                             "results": {v: {"error": f"{type(e).__name__}: {e}"[:400]}
                                         for v in variants}})
            log(f"  (elapsed {time.time() - t_start:.0f} s)")
            _write(args, meta, kernel_opts, runs)  # partial results survive a time limit
    doc = {"meta": meta, "suite": args.suite, "kernel_options": kernel_opts, "runs": runs,
           "rows": flat_rows(meta, runs),
           "protocol": f"{n_calls or CALLS} calls per jitted program on distinct input copies "
                       f"(len(sets) of them); ms: {PROGRAMS} runs of the program dispatched "
                       "back to back, one sync, median of reps; ms_one_program: one run per "
                       "sync"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_{args.suite}{args.tag}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    if args.suite not in ("sweep", "profile", "trace"):
        png = os.path.join(args.out, f"kernels_{args.suite}{args.tag}.png")
        if args.suite in ("cpu", "tpu"):  # the four measures of compare.py, for this device
            from compare import BenchFile
            from compare import plot as plot_measures

            plot_measures([BenchFile(path)], png)
        else:
            plot(runs, png, meta)
        summary(runs, log, meta.get("copy_gbps"))
    if args.suite == "trace":
        plot_trace(runs, os.path.join(args.out, f"kernels_{args.suite}{args.tag}.png"))
    log(f"total {time.time() - t_start:.0f} s; wrote {path}")


def merge(args):
    """--merge: the runs of several result files as one suite (no device needed)."""
    docs = [json.load(open(p)) for p in args.merge]
    kinds = {d["meta"]["device_kind"] for d in docs}
    if len(kinds) != 1:
        raise SystemExit(f"--merge: the files come from different devices {sorted(kinds)}")
    by_label = {}
    for d in docs:
        for run in d["runs"]:
            by_label[run["shape"]["label"]] = run
    runs = list(by_label.values())
    meta = dict(docs[0]["meta"], merged_from=[os.path.basename(p) for p in args.merge],
                copy_gbps_each=[d["meta"].get("copy_gbps") for d in docs])
    suite = args.suite if args.suite != "auto" else docs[0].get("suite", "full")
    doc = {"meta": meta, "suite": suite, "kernel_options": docs[0].get("kernel_options", {}),
           "runs": runs, "rows": flat_rows(meta, runs),
           "protocol": docs[0].get("protocol", "see bench_kernels.py")}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_{suite}{args.tag}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    plot(runs, os.path.join(args.out, f"kernels_{suite}{args.tag}.png"), meta)
    summary(runs, print, meta.get("copy_gbps"))
    print(f"merged {len(runs)} shapes from {len(docs)} files into {path}")


def _write(args, meta, kernel_opts, runs):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"kernels_{args.suite}{args.tag}.json"), "w") as f:
        json.dump({"meta": meta, "suite": args.suite, "kernel_options": kernel_opts, "runs": runs,
                   "rows": flat_rows(meta, runs), "partial": True}, f, indent=1)


def sweep(log, reps):
    """Tunables of the fused kernels at the two mandatory shapes."""
    k = 1024
    out = []
    for shape in (Shape(8, 32 * k), Shape(1, 128 * k)):
        nsplit0 = max(1, round(4 * 132 / (shape.B * shape.Hkv)))
        base = {"block_tokens": 128, "num_stages": 3}
        pts = [("innerq", base), ("innerq", dict(base, max_registers=168)),
               ("innerq", dict(base, num_stages=4, max_registers=168)),
               ("innerq", dict(base, max_registers=128)),
               ("innerq", {"block_tokens": 256, "num_stages": 3}),
               ("innerq", dict(base, max_registers=168, num_splits=max(1, nsplit0 // 2))),
               ("innerq", dict(base, max_registers=168, num_splits=nsplit0 * 2)),
               ("outerq", {"block_tokens": 128, "num_stages": 3}),
               ("outerq", {"block_tokens": 256, "num_stages": 3})]
        names = ["bf16_pallas", "innerq_fused", "outerq_fused"]
        names += [f"{kind}_fused@{json.dumps(o)}" for kind, o in pts]
        res = run_shape(shape, names, reps, {}, log)
        out.append(res)
        log("  sweep " + shape.label)
        for name, v in sorted(res["results"].items(), key=lambda kv: kv[1].get("ms", 1e9)):
            if "ms" in v:
                log(f"    {v['ms']:8.4f} ms {v['gbps']:6.0f} GB/s  {name}")
            else:
                log(f"    FAILED {name}: {v}")
    return out


def _shapes_arg(args):
    """The shapes of the profile and trace suites: --shapes JSON, default B 8 / T 32k."""
    spec = json.loads(args.shapes) if args.shapes else [[8, 32 * 1024, {}]]
    return [Shape(B, T, **kw) for B, T, kw in spec]


def _ablations():
    """Kernel ablations of the fused InnerQ op: name -> {piece: replacement}. Each replaces
    one piece of the kernel (patched by :func:`_patched`, never in the kernel modules);
    timed like a variant, the differences locate the time. ``no_windows`` skips the window
    programs' work, ``no_combine`` the last program's merge of the split partials,
    ``no_quantized`` the split programs' loop (the time left is the skeleton: launch,
    window programs, merge)."""
    from pallas_kernels import decode as dec
    from pallas_kernels import window_blocks as wb

    def no_v_sum(vwt, vst, vzt, pexp, psum, poff, geo):
        # keeps the value loads alive, skips the unpack, MMAs and epilogue
        keep = (jnp.sum(vwt.astype(jnp.float32)) + jnp.sum(vst.astype(jnp.float32))
                + jnp.sum(vzt.astype(jnp.float32)))
        return jnp.zeros((geo.D, geo.NR), jnp.float32) + 0.0 * keep + jnp.sum(psum, axis=0)[None, :]

    def no_v_ops(p, geo):
        psum = jnp.sum(p.reshape(geo.ngv, -1, geo.NR), axis=1)
        return [], psum, psum

    def no_k(kw, ks, kz, qexp, koff, qsum_cols, geo):
        # keeps the key loads alive, skips the unpack, MMAs and epilogue
        x = (jnp.max(kw, axis=1, keepdims=True).astype(jnp.float32) * 1e-9
             + jnp.sum(ks.astype(jnp.float32) + kz.astype(jnp.float32), axis=1, keepdims=True))
        return jnp.broadcast_to(x, (geo.BT // geo.P, geo.P * geo.NR)).reshape(geo.BT, geo.NR)

    def no_win(q_ref, windows, D, chunk=32, part=None):
        nh = wb.WINDOW_HEADS
        return (jnp.zeros((nh, D), jnp.float32), jnp.full((nh,), dec.NEG, jnp.float32),
                jnp.zeros((nh,), jnp.float32))

    def no_comb(po_ref, pm_ref, pl_ref, n, NR, rows, D, step=8):
        return jnp.zeros((rows, D), jnp.float32)  # no partial read: timing only

    def no_part(layout):
        def part(q_ref, refs, nq, start, chunk, geo):
            return (jnp.zeros((geo.NR, geo.D), jnp.float32),
                    jnp.full((geo.NR,), dec.NEG, jnp.float32), jnp.zeros((geo.NR,), jnp.float32))
        return part

    return {"full": {}, "no_value_side": {"vs": no_v_sum, "vo": no_v_ops},
            "no_key_dots": {"ks": no_k},
            "no_value_side+no_key_dots": {"vs": no_v_sum, "vo": no_v_ops, "ks": no_k},
            "no_windows": {"win": no_win}, "no_combine": {"comb": no_comb},
            "no_quantized": {"part": no_part},
            "no_quantized+no_windows": {"part": no_part, "win": no_win}}


@contextlib.contextmanager
def _patched(patch):
    """The fused op with the pieces ``patch`` names (see :func:`_ablations`) replaced; the
    op's built calls are dropped on entry and exit so no patched build outlives it."""
    from pallas_kernels import decode as dec
    from pallas_kernels import innerq_blocks as ib
    from pallas_kernels import window_blocks as wb

    slots = {"ks": (ib, "block_key_scores"), "vo": (ib, "value_operands"),
             "vs": (ib, "block_value_sum"), "win": (wb, "window_part"),
             "comb": (dec, "_combine_partials"), "part": (dec, "_part")}
    orig = {k: getattr(mod, name) for k, (mod, name) in slots.items()}
    try:
        for k, fn in patch.items():
            setattr(*slots[k], fn)
        dec._build_call.cache_clear()
        yield
    finally:
        for k, (mod, name) in slots.items():
            setattr(mod, name, orig[k])
        dec._build_call.cache_clear()


def profile(log, reps, args, save):
    """Where the fused InnerQ kernel's time goes: :func:`_ablations` at each --shapes shape,
    timed (wall time per call). ``--ncu`` runs only the full kernel a few times, for Nsight
    Compute. (The trace suite takes the same ablations by device time.)"""
    ablations = {"full": {}} if args.ncu else _ablations()
    out = []
    for shape in _shapes_arg(args):
        names = {}
        for ab, patch in ablations.items():
            with _patched(patch):
                pts = json.loads(args.options or "{}").get("points", [{}])
                for opts in (pts if ab == "full" else pts[:2]):
                    name = f"innerq_fused@{json.dumps(opts)}"
                    peers = ["bf16_pallas"] if ab == "full" and not names else []
                    r = run_shape(shape, [name] + peers, reps, {}, log, check=(ab == "full"),
                                  warm_s=args.warm_s)
                    r["ablation"] = ab
                    names[f"{ab} {json.dumps(opts)}"] = r["results"].get(name)
                    out.append(r)
        log("  profile " + shape.label)
        for name, v in names.items():
            log(f"    {v.get('ms', float('nan')):8.4f} ms  {name}" if v else f"    FAILED {name}")
        save(out)
    return out


# the trace suite's ops through the dispatch (``--options '{"ops": [...]}'`` names them):
# the paper's InnerQ, InnerQ-H (keys and values rotated) and the recommended cache
# (CacheConfig.recommended), as CacheConfig.innerq overrides
TRACE_DISPATCH = {"innerq_dispatch": {}, "innerq-h_dispatch": {"rotation": "keys_values"},
                  "recommended_dispatch": {"rotation": "keys_values", "sink": 36, "recent": 96}}


def trace(log, args, save):
    """Device time of the timed program (jax profiler), per --shapes shape and op: the
    timed ms per call beside the kernels' summed durations, their union (busy) and the
    first-to-last span, per call, for the fused Triton ops, the Mosaic op (on a GPU) and
    jax's bf16 Pallas kernel (cuDNN's too where "ops" names "cudnn"); with the rotating
    input copies of the timing protocol and with one input set. ``span - busy`` is time the
    device waited for launches.

    ``--options``: {"ops": [names], name: {op options}}; "points": [{options}, ...] (one
    case per point of the op "points_op" names, default the fused InnerQ op, named
    ``{op}@{point}``); "ablations": [names of :func:`_ablations`] (the fused InnerQ op's, each
    on its first point, named ``innerq_fused~{name}``; not checked: an ablation computes
    something else); "inputs":
    ["rotating"] or ["one set"] to time only those inputs."""
    from trace_summary import trace_runs

    opts = json.loads(args.options or "{}")
    out = []
    for shape in _shapes_arg(args):
        B, T, H, r, D = shape.B, shape.T, shape.Hkv, shape.r, shape.D
        key = jax.random.PRNGKey(0)
        lengths = jnp.full((B,), T, jnp.int32)
        k, v = _random_kv(key, B, H, T, D)
        q = jax.random.normal(key, (B, H * r, D), jnp.float32)
        ops = {"innerq_fused": ("innerq", quantized_decode_attention),
               "outerq_fused": ("outerq", quantized_decode_attention)}
        if jax.default_backend() == "gpu":
            ops["innerq_mgpu"] = ("innerq", mgpu_decode_attention)
        wanted = opts.get("ops")  # only these ops ("ops" in --options), caches built for them
        if wanted:
            ops = {n: o for n, o in ops.items() if n in wanted}
        cases, refs = {}, {}
        TOL = {"innerq_fused": TOL_QUANT, "outerq_fused": TOL_OUTERQ, "innerq_mgpu": TOL_QUANT,
               "bf16_pallas": TOL_BF16, "cudnn": TOL_BF16,
               **{n: TOL_QUANT for n in TRACE_DISPATCH}}
        # through the dispatch, the model's query in (its preparation and the output's finish
        # included), only where asked for by name
        def points(name):  # case name -> the op's options
            if name == opts.get("points_op", "innerq_fused") and "points" in opts:
                return {f"{name}@{json.dumps(p)}": p for p in opts["points"]}
            return {name: opts.get(name, {})}

        for name, over in TRACE_DISPATCH.items():
            if name in (wanted or ()):
                cfg = shape.cfg("innerq", **over)
                layer = _prefill(k, v, lengths, cfg)
                ref = decode_attention_layer(q, layer, lengths, cfg, backend="reference")
                for case, p in points(name).items():
                    cases[case] = (functools.partial(decode_attention_layer, cfg=cfg,
                                                     backend="pallas", **p), (q, layer, lengths))
                    refs[case], TOL[case] = ref, TOL[name]
        patches = {}
        for name, (kind, op) in ops.items():
            cfg = shape.cfg(kind)
            layer = _prefill(k, v, lengths, cfg)
            qp = prepare_query(q, layer, cfg, 1 / math.sqrt(D))
            ref = quantized_attention_core(qp, layer, lengths, cfg)
            variants = points(name)
            if name == "innerq_fused":
                first = next(iter(variants.values()))
                for ab in opts.get("ablations", []):
                    variants[f"{name}~{ab}"], patches[f"{name}~{ab}"] = first, _ablations()[ab]
            for case, p in variants.items():
                cases[case] = (functools.partial(op, cfg=cfg, **p), (qp, layer, lengths))
                refs[case], TOL[case] = ref, TOL[name]
        qd = q.reshape(B, H, r, D) / math.sqrt(D)
        kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        if not wanted or "bf16_pallas" in wanted:
            cases["bf16_pallas"] = (bf16_pallas, (qd, kb, vb))
            refs["bf16_pallas"] = dense_reference(qd, kb, vb)
        if "cudnn" in (wanted or ()):  # by name only: cuDNN runs on NVIDIA GPUs alone
            cases["cudnn"] = (cudnn, (qd, jnp.swapaxes(kb, 1, 2), jnp.swapaxes(vb, 1, 2)))
            refs["cudnn"] = refs["bf16_pallas"] if "bf16_pallas" in refs else dense_reference(
                qd, kb, vb)
        for name, (fn, args0) in cases.items():
            with _patched(patches.get(name, {})):
                nbytes = _nbytes(args0)
                try:  # checked against the reference before anything is timed
                    err = _rel(fn(*args0), refs[name])
                    assert err < TOL[name] or name in patches, f"rel err {err:.2e}"
                except AssertionError as e:
                    log(f"  {shape.label} {name}: MISMATCH, not timed: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    log(f"  {shape.label} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                for label, sets in (("rotating", _copies(args0, _n_sets(nbytes, nbytes))),
                                    ("one set", [args0])):
                    if label not in opts.get("inputs", ("rotating", "one set")):
                        continue
                    try:
                        ms = time_calls(fn, sets, args.reps, warm_s=args.warm_s)[0]
                        multi, calls = _multi(fn, sets)
                        jax.block_until_ready(multi(calls))
                        per_dev, host = trace_runs(lambda: multi(calls), 2, len(calls),
                                                   with_host=True)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        log(f"  {shape.label} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                        continue
                    for dev, s in per_dev.items():
                        log(f"  {shape.label} {name:13s} {label:8s} timed {ms * 1e3:7.1f} us | "
                            f"kernels {s['kernel_ms'] * 1e3:7.1f} busy {s['busy_ms'] * 1e3:7.1f} "
                            f"span {s['span_ms'] * 1e3:7.1f} us, {s['ops']:.1f} ops per call")
                        for op_name, (cnt, ms_) in list(s["by_op"].items())[:6]:
                            log(f"      {ms_ * 1e3:8.1f} us  x{cnt:<4.1f} {op_name[:90]}")
                        for op_name, ms_ in list(s["idle_before"].items())[:4]:
                            log(f"      idle {ms_ * 1e3:6.1f} us before {op_name[:80]}")
                        for op_name, (cnt, ms_) in list(host.items())[:6]:
                            log(f"      host {ms_ * 1e3:6.1f} us  x{cnt:<5.1f} {op_name[:80]}")
                        out.append({"shape": vars(shape) | {"label": shape.label}, "op": name,
                                    "inputs": label, "n_sets": len(sets), "timed_ms": ms,
                                    "rel_err": err, "bytes": nbytes,
                                    "device": dev, **{k_: s[k_] for k_ in (
                                        "ops", "kernel_ms", "busy_ms", "span_ms", "by_op",
                                        "idle_before")}, "host": host})
                    del sets
            del fn, args0
        del cases, refs, k, v
        save(out)
    return out


def summary(runs, log, copy_gbps=None):
    """The table: per (shape, variant) ms, GB/s, speed-up on the fastest bf16 peer and on
    OuterQ, and the roofline (the variant's bytes at ``copy_gbps``)."""
    log("")
    log(f"{'shape':34s} {'variant':44s} {'ms':>8s} {'GB/s':>6s} {'vs bf16':>8s} {'vs outerq':>9s}"
        f" {'roofline':>8s}")
    for run in runs:
        res = run["results"]
        peers = [res[p]["ms"] for p in BF16_PEERS if "ms" in res.get(p, {})]
        best = min(peers) if peers else None
        # against the fastest OuterQ point measured at this shape (defaults or a tunable)
        oqs = [v["ms"] for n, v in res.items() if n.startswith("outerq_fused") and "ms" in v]
        oq = min(oqs) if oqs else None
        for name, v in res.items():
            if "ms" not in v:
                log(f"{run['shape']['label']:34s} {name:44s} {'failed':>8s}")
                continue
            sp = f"{best / v['ms']:7.2f}x" if best else ""
            so = f"{oq / v['ms']:8.2f}x" if oq and name.startswith("innerq") else ""
            gb = f"{v['gbps']:6.0f}" if v["gbps"] >= 10 else f"{v['gbps']:6.2f}"
            rf = roofline_ms(v.get("bytes"), copy_gbps)
            rf = f"{rf:8.4f}" if rf else ""
            log(f"{run['shape']['label']:34s} {name:44s} {v['ms']:8.4f} {gb} {sp:>8s} {so:>9s}"
                f" {rf:>8s}")


def plot_trace(records, path):
    """Per shape: timed us per call beside the traced device busy time and span, per op."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = list(dict.fromkeys(r["shape"]["label"] for r in records))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, label in zip(axes[0], shapes):
        recs = [r for r in records if r["shape"]["label"] == label]
        names = [f"{r['op']}\n{r['inputs']}" for r in recs]
        x = np.arange(len(recs))
        for i, (key, what) in enumerate((("timed_ms", "timed"), ("busy_ms", "device busy"),
                                         ("span_ms", "device span"))):
            ax.bar(x + (i - 1) * 0.27, [r[key] * 1e3 for r in recs], 0.27, label=what)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("us per call")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(runs, path, meta):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, B in zip(axes, (1, 8)):
        series = {}
        for run in runs:
            sh = run["shape"]
            if sh["B"] != B or sh["Hkv"] != 8 or sh["D"] != 128 or sh["bits"] != 2 or sh["G"] != 32:
                continue
            res = run["results"]
            peers = [res[p]["ms"] for p in BF16_PEERS if "ms" in res.get(p, {})]
            if not peers:
                continue
            for name in ("innerq_fused", "innerq_mgpu", "outerq_fused", "innerq-h_fused",
                         "innerq_tpu", "outerq_tpu", "innerq-h_tpu", "innerq_ref", "outerq_ref",
                         "int8_xla", "bf16_xla", "cudnn", "bf16_paged_tpu"):
                if "ms" in res.get(name, {}):
                    series.setdefault(name, []).append((sh["T"], min(peers) / res[name]["ms"]))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (k tokens)")
        ax.set_title(f"B={B}, Hq 32 / Hkv 8, D 128, 2-bit G32")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup vs fastest bf16 peer")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{meta['device_kind']}, jax {meta['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

"""Probe of the Mosaic GPU kernel on the GPU machine: one checked run, kernel-only timings.

    PYTHONPATH=$PWD python3 benchmarks/mgpu_probe.py --stage check   # small shapes, rel. errors
    PYTHONPATH=$PWD python3 benchmarks/mgpu_probe.py --stage kernel --out $OUT  # tunables

``check`` runs one small random cache through the kernel and prints the relative
error against the reference (run it with MOSAIC_GPU_DUMP_PTXAS / _SASS set to get
the compiler's report). ``kernel`` times the kernel launch alone (operands prepared
outside the timed program) and the whole op, over the tunables given by --points,
at B 8 / T 32k and B 1 / T 128k, with the protocol of bench_kernels.py (random
caches checked against the reference first, rotating input copies, one sync,
median). Writes mgpu_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import (
    Shape,
    _copies,
    _prefill,
    _random_kv,
    _rel,
    measure_copy_gbps,
    roofline_ms,
    time_calls,
)
from innerq_jax.reference import prepare_query, quantized_attention_core
from pallas_kernels import mgpu_decode as md


def _point_mosaic_at_nvdisasm(log):
    """Mosaic GPU disassembles its SASS dump with $MOSAIC_GPU_CUDA_ROOT/bin/nvdisasm; jax sets
    that root to its pip CUDA, which has no nvdisasm: point it at one that exists."""
    import glob
    import shutil

    for cand in [shutil.which("nvdisasm"), *sorted(glob.glob("/usr/local/cuda*/bin/nvdisasm")),
                 *sorted(glob.glob("/opt/*/bin/nvdisasm")), "/usr/bin/nvdisasm"]:
        if cand and os.path.exists(cand):
            os.environ["MOSAIC_GPU_CUDA_ROOT"] = os.path.dirname(os.path.dirname(cand))
            log(f"nvdisasm: {cand}")
            return
    log("nvdisasm: none found")


def check_stage(log, points):
    _point_mosaic_at_nvdisasm(log)
    for B, T, H, r, D, bits, G in [(2, 2048, 2, 4, 128, 2, 32), (3, 3072, 2, 3, 64, 4, 64)]:
        shape = Shape(B, T, Hq=H * r, Hkv=H, D=D, bits=bits, G=G)
        key = jax.random.PRNGKey(T)
        k, v = _random_kv(key, B, H, T, D)
        lengths = jnp.asarray(np.linspace(T, 1, B).astype(np.int32))
        q = jax.random.normal(jax.random.fold_in(key, 1), (B, H * r, D), jnp.float32)
        for opts in points:
            opts = dict(opts)
            cfg = shape.cfg(opts.pop("kind", "innerq"))  # "kind": the cache layout
            layer = _prefill(k, v, lengths, cfg)
            qp = prepare_query(q, layer, cfg, 1 / math.sqrt(D))
            ref = quantized_attention_core(qp, layer, lengths, cfg)
            try:
                t0 = time.time()
                fn = functools.partial(md.mgpu_decode_attention, cfg=cfg,
                                       **dict(dict(num_splits=3), **opts))
                out = jax.jit(fn)(qp, layer, lengths)
                out.block_until_ready()
                log(f"check {shape.label} {json.dumps(opts)} lengths "
                    f"{np.asarray(lengths).tolist()}: rel err {_rel(out, ref):.2e} "
                    f"(compile+run {time.time() - t0:.1f} s)")
            except Exception as e:  # noqa: BLE001
                log(f"check {shape.label} {json.dumps(opts)} FAILED {type(e).__name__}: "
                    f"{str(e)[:2000]}")
                traceback.print_exc()


def kernel_stage(log, points, reps, save, copy_gbps):
    """Times each point at the two long shapes; ``save(records)`` after every record, so a
    time limit keeps what was measured."""
    out = []
    for B, T in [(8, 32 * 1024), (1, 128 * 1024)]:
        shape = Shape(B, T)
        key = jax.random.PRNGKey(B * 1000 + T)
        lengths = jnp.full((B,), T, jnp.int32)
        k, v = _random_kv(key, B, shape.Hkv, T, shape.D)
        q = jax.random.normal(jax.random.fold_in(key, 7), (B, shape.Hq, shape.D), jnp.float32)
        built = (None,)  # (kind, cfg, ref, sets, nbytes): one layout's copies at a time
        for opts in points:
            rec = {"shape": shape.label, "options": opts}
            opts = dict(opts)
            kind = opts.pop("kind", "innerq")  # the cache layout of this point
            if built[0] != kind:
                built = (None,)
                cfg = shape.cfg(kind)
                layer = _prefill(k, v, lengths, cfg)
                qp = prepare_query(q, layer, cfg, 1 / math.sqrt(shape.D))
                ref = quantized_attention_core(qp, layer, lengths, cfg)
                nbytes = sum(layer.k.nbytes()[f] + layer.v.nbytes()[f]
                             for f in ("codes", "scale", "zero"))
                nbytes += (layer.sink_k.nbytes + layer.recent_k.nbytes) * 2 + qp.nbytes
                n_sets = max(4, math.ceil(6 * 50 * 2**20 / nbytes))
                built = (kind, cfg, ref, _copies((qp, layer, lengths), n_sets), nbytes)
                del layer
            _, cfg, ref, sets, nbytes = built
            qp, layer = sets[0][0], sets[0][1]
            try:
                fn = functools.partial(md.mgpu_decode_attention, cfg=cfg, **opts)
                out_ = jax.jit(fn)(qp, layer, lengths)
                if opts.get("ablate"):  # timing ablations compute a wrong result on purpose
                    try:
                        err = _rel(out_, ref)
                    except AssertionError:
                        err = float("nan")
                else:
                    err = _rel(out_, ref)
                    tol = 1e-2 if kind == "innerq" else 2e-2  # bench_kernels' TOL_QUANT / TOL_OUTERQ
                    if err > tol:
                        raise AssertionError(f"rel err {err:.2e}")
                rec["rel_err"] = err
                med, lo, hi = time_calls(lambda a, b_, c: fn(a, b_, c), sets, reps)
                rec.update(op_ms=med, op_min_ms=lo, op_gbps=nbytes / med / 1e6)
                # the kernel launch alone, its operands prepared outside the timed program
                ksets = []
                for qp_, lay, len_ in sets:
                    call, operands, geo, *_ = md.prepare_call(qp_, lay, len_, cfg, **opts)
                    ksets.append((operands[1], *operands[:1], *operands[2:]))
                kmed, klo, _ = time_calls(
                    lambda qe, n, *rest: call(n, qe, *rest)[0], ksets, reps)
                NS = int(call(*operands)[0].shape[2])
                rec.update(kernel_ms=kmed, kernel_min_ms=klo, kernel_gbps=nbytes / kmed / 1e6,
                           splits=NS)
                log(f"  {shape.label} {json.dumps(opts):55s} op {med:.4f} ms "
                    f"({nbytes / med / 1e6:.0f}"
                    f" GB/s)  kernel {kmed:.4f} ms ({nbytes / kmed / 1e6:.0f} GB/s)  NS {NS}"
                    f"  err {err:.1e}")
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"[:600]
                log(f"  {shape.label} {json.dumps(opts)} FAILED {rec['error'][:300]}")
            rec.update(bytes=nbytes, roofline_ms=roofline_ms(nbytes, copy_gbps))
            out.append(rec)
            save(out)
        del built, k, v
    return out


def best_point(path: str) -> dict:
    """The options of the fastest checked point at B 8 / T 32k in a kernel-stage JSON ({} if none)."""
    try:
        recs = json.load(open(path))["records"]
    except (OSError, ValueError, KeyError):
        return {}
    ok = [r for r in recs if "op_ms" in r and not r["options"].get("ablate")
          and r["options"].get("kind", "innerq") == "innerq"
          and r["shape"].startswith("B8-T32k")]
    return min(ok, key=lambda r: r["op_ms"])["options"] if ok else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["check", "kernel", "best"], required=True,
                    help="best: print the options of the fastest point in mgpu_probe<tag>.json")
    ap.add_argument("--points", default='[{}]', help="JSON list of kernel option dicts")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    path = os.path.join(args.out, f"mgpu_probe{args.tag}.json")
    if args.stage == "best":
        print(json.dumps(best_point(path)))
        return 0
    dev = jax.devices()[0]
    meta = {"device_kind": dev.device_kind, "jax": jax.__version__, "sms": md.sm_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"device {dev.device_kind} ({meta['sms']} SMs) jax {jax.__version__}", flush=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    if args.stage == "check":
        check_stage(log, json.loads(args.points))
        return 0
    meta["copy_gbps"] = measure_copy_gbps()  # the roofline's bandwidth, measured in this run
    os.makedirs(args.out, exist_ok=True)

    def save(recs, partial=True):
        with open(path, "w") as f:
            json.dump({"meta": meta, "records": recs, "log": lines, "partial": partial}, f,
                      indent=1)

    save(kernel_stage(log, json.loads(args.points), args.reps, save, meta["copy_gbps"]),
         partial=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

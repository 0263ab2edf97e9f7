"""The kernel benchmark's bookkeeping (no timing): rows carry their roofline, and --merge
completes a suite a time limit cut from its partial file and the missing shapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_kernels  # noqa: E402


def _doc(device, copy_gbps, shapes, rng, partial=False):
    """A result file as bench_kernels writes it, with random timings."""
    runs = []
    for label, B, T in shapes:
        results = {}
        for name in ("bf16_pallas", "innerq_fused"):
            ms = float(rng.uniform(0.01, 0.3))
            nbytes = int(rng.integers(10**6, 10**9))
            results[name] = dict(ms=ms, min_ms=ms * 0.9, max_ms=ms * 1.1, bytes=nbytes,
                                 gbps=nbytes / ms / 1e6, rel_err=float(rng.uniform(1e-4, 1e-2)),
                                 ms_one_program=ms * 1.2)
        shape = dict(B=B, T=T, Hq=32, Hkv=8, D=128, bits=2, G=32, r=4, label=label)
        runs.append({"shape": shape, "n_sets": 4, "results": results})
    meta = {"device_kind": device, "platform": "gpu", "backend": "gpu", "jax": "0.11.2",
            "copy_gbps": copy_gbps}
    doc = {"meta": meta, "suite": "full", "kernel_options": {}, "runs": runs,
           "rows": bench_kernels.flat_rows(meta, runs)}
    if partial:
        doc["partial"] = True
    return doc


def test_rows_carry_the_roofline_of_their_bytes():
    rng = np.random.default_rng(3)
    doc = _doc("NVIDIA H200", 3802.9, [("B8-T32k", 8, 32768)], rng)
    for row, (name, res) in zip(doc["rows"], doc["runs"][0]["results"].items()):
        assert row["variant"] == name
        # bytes at GB/s, in ms: bytes / (GB/s * 1e9) * 1e3
        assert row["roofline_ms"] == pytest.approx(res["bytes"] / 3802.9e9 * 1e3, rel=1e-12)
    assert bench_kernels.roofline_ms(None, 3802.9) is None
    assert bench_kernels.roofline_ms(10**6, None) is None


def test_merge_completes_a_cut_suite(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    cut = _doc("NVIDIA H200", 3800.0, [("B8-T32k", 8, 32768), ("SmolLM2", 8, 8192)], rng,
               partial=True)
    rest = _doc("NVIDIA H200", 3900.0, [("SmolLM2", 8, 8192)], rng)
    paths = [tmp_path / "cut.json", tmp_path / "rest.json"]
    for p, d in zip(paths, (cut, rest)):
        p.write_text(json.dumps(d))
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--merge", *map(str, paths),
                                      "--suite", "full", "--tag", "_m", "--out", str(tmp_path)])
    bench_kernels.main()
    out = json.loads((tmp_path / "kernels_full_m.json").read_text())
    assert (tmp_path / "kernels_full_m.png").stat().st_size > 0
    assert "partial" not in out
    assert out["meta"]["merged_from"] == ["cut.json", "rest.json"]
    assert out["meta"]["copy_gbps_each"] == [3800.0, 3900.0]
    labels = [r["shape"]["label"] for r in out["runs"]]
    assert labels == ["B8-T32k", "SmolLM2"]  # the suite's order, each shape once
    # the later file's shape replaces the cut one; the first shape is kept as it was
    assert out["runs"][1] == rest["runs"][0]
    assert out["runs"][0] == cut["runs"][0]
    assert len(out["rows"]) == 4 and all(r["roofline_ms"] > 0 for r in out["rows"])


def test_merge_refuses_files_of_two_devices(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    paths = []
    for i, dev in enumerate(("NVIDIA H200", "NVIDIA H100")):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps(_doc(dev, 3000.0, [("B1-T4k", 1, 4096)], rng)))
        paths.append(str(p))
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--merge", *paths, "--out",
                                      str(tmp_path)])
    with pytest.raises(SystemExit, match="different devices"):
        bench_kernels.main()


def test_kernel_ir_fingerprint_ignores_locations_and_sees_the_kernel():
    """benchmarks/kernel_ir.py: the same kernel gives the same fingerprint whatever line of
    which file built it (no source locations), and a structural option changes it."""
    import kernel_ir

    cases = {c[0]: c for c in kernel_ir.CASES}
    name, cfg, D, Hq, Hkv, B, opts = cases["innerq4-G64-D64"]  # the smallest InnerQ case
    first = kernel_ir.fingerprint(cfg, D, Hq, Hkv, B, opts)
    assert len(first) == 16
    assert kernel_ir.fingerprint(cfg, D, Hq, Hkv, B, opts) == first
    assert kernel_ir.fingerprint(cfg, D, Hq, Hkv, B, dict(opts, tail="zero")) != first
    # the OuterQ layout of the same shape is another kernel
    outer = cases["outerq4-G64-D64"]
    assert kernel_ir.fingerprint(*outer[1:]) != first
    # and the e4m3 keys are another kernel than the bf16 keys of the same shape
    e4m3 = cases["innerq2-e4m3-parts2"]
    assert kernel_ir.fingerprint(*e4m3[1:]) != kernel_ir.fingerprint(
        *e4m3[1:-1], dict(e4m3[-1], key_format="bf16"))


def test_kernel_ir_fingerprints_the_triton_epilogue():
    """benchmarks/kernel_ir.py: the epilogue's and the merge's Triton IR, one fingerprint
    each, the same on a second lowering; another channel-block count is another kernel."""
    import kernel_ir

    name, cfg, D, Hq, Hkv, B, NS, n_dc = kernel_ir.EPILOGUE_CASES[2]  # the smallest case
    first = kernel_ir.epilogue_fingerprints(cfg, D, Hq, Hkv, B, NS, n_dc)
    assert set(first) == {"epilogue", "merge"} and first["epilogue"] != first["merge"]
    assert all(len(v) == 16 for v in first.values())
    assert kernel_ir.epilogue_fingerprints(cfg, D, Hq, Hkv, B, NS, n_dc) == first
    other = kernel_ir.epilogue_fingerprints(cfg, D, Hq, Hkv, B, NS, 1)
    assert other["epilogue"] != first["epilogue"] and other["merge"] != first["merge"]


def test_trace_runs_traces_every_run(monkeypatch):
    """trace_summary.trace_runs: the program run the given number of times under the
    profiler, its trace file summarized per step (runs x steps per run)."""
    import jax
    import jax.numpy as jnp
    import trace_summary

    seen = {}

    def fake_summarize(path, steps):
        seen.update(path=path, steps=steps)
        return {"/device:GPU:0": {"busy_ms": 1.0}}

    monkeypatch.setattr(trace_summary, "summarize", fake_summarize)
    runs = []
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(64), jnp.float32)
    out = trace_summary.trace_runs(lambda: runs.append(1) or f(x), 3, 4)
    assert len(runs) == 3 and seen["steps"] == 12
    assert seen["path"].endswith("perfetto_trace.json.gz")
    assert out == {"/device:GPU:0": {"busy_ms": 1.0}}
    # with_host: the host threads' summary of the same trace beside it
    monkeypatch.setattr(trace_summary, "host_summary", lambda path, steps: {"p": path, "s": steps})
    dev, host = trace_summary.trace_runs(lambda: f(x), 2, 4, with_host=True)
    assert dev == {"/device:GPU:0": {"busy_ms": 1.0}} and host["s"] == 8
    assert host["p"].endswith("perfetto_trace.json.gz")


def test_warm_runs_the_program_until_the_time_is_spent():
    """Each point runs back to back before it is timed: at least the given seconds, one sync
    per run, and at least one run when no warm-up is asked for."""
    import time

    ran, ends = [], []

    def multi(calls):
        ran.append(len(calls))
        time.sleep(0.01)
        ends.append(time.perf_counter())
        return np.asarray(calls)

    calls = list(np.random.default_rng(6).normal(size=3))
    t0 = time.perf_counter()
    runs = bench_kernels._warm(multi, calls, 0.05)
    assert time.perf_counter() - t0 >= 0.05  # it ran until the time was spent
    # and stopped at the first run that ended past it (5 ms: the two clocks' start apart)
    assert runs == len(ran) >= 2 and set(ran) == {3}
    assert all(e - t0 < 0.055 for e in ends[:-1])
    ran.clear()
    assert bench_kernels._warm(multi, calls, 0.0) == 1 and ran == [3]


def test_cfg_variants_take_the_query_dtype_apart_from_the_cache(monkeypatch):
    """``cfg_fused@{"query_dtype": "bfloat16", ...}``: the call gets bf16 query heads (as a
    bf16 model's projection gives them), the rest of the JSON configures the cache, and the
    point is checked against the reference path before it would be timed (the Triton
    kernel in interpret mode here; the timing itself is stubbed)."""
    seen = []
    dispatch = bench_kernels.decode_attention_layer

    def interpreted(q, layer, lengths, cfg, backend="auto", **kw):
        if backend == "pallas":
            seen.append((q.dtype, cfg.rotation, cfg.sink))
            backend = "interpret"
        return dispatch(q, layer, lengths, cfg, backend=backend, **kw)

    def one_call(fn, arg_sets, reps, n_calls=None, warm_s=0.0, **kw):
        fn(*arg_sets[0])
        return dict(ms=1.0, min_ms=1.0, max_ms=1.0, ms_one_program=1.0)

    monkeypatch.setattr(bench_kernels, "decode_attention_layer", interpreted)
    monkeypatch.setattr(bench_kernels, "time_calls_detail", one_call)
    monkeypatch.setattr(bench_kernels, "_n_sets", lambda *a: 1)
    shape = bench_kernels.Shape(1, 512, Hq=4, Hkv=2, D=64)
    names = ['cfg_fused@{"query_dtype": "bfloat16", "rotation": "keys", "sink": 4}',
             "cfg_fused"]
    out = bench_kernels.run_shape(shape, names, 1, {}, lambda *_: None)["results"]
    assert set(out) == set(names)
    for n in names:
        assert "error" not in out[n] and out[n]["rel_err"] < bench_kernels.TOL_QUANT
    assert seen[0][0] == np.dtype("bfloat16") and seen[0][1:] == ("keys", 4)
    assert seen[-1][0] == np.dtype("float32") and seen[-1][1] == "none"
    with pytest.raises(ValueError, match=r"query_dtype='int8'; choose one of"):
        bench_kernels.run_shape(shape, ['cfg_fused@{"query_dtype": "int8"}'], 1, {},
                                lambda *_: None)


def test_ncu_summary_sums_the_loop_by_class_and_reason(tmp_path):
    """benchmarks/ncu_summary.py on a hand-made source page: the loop is the instructions
    executed at least half as often as the most executed one, each class counts executions
    per loop trip, and the not-issued samples (plus "selected") go to the instruction's class;
    predicates and opcode modifiers do not change the class."""
    import csv
    import gzip

    import ncu_summary

    reasons = ["barrier", "short_sb", "selected", "wait"]
    header = (["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
              + [f"stall_{r}" for r in reasons] + [f"stall_{r} (Not Issued)" for r in reasons])
    rows = [  # (source, executions, samples, not-issued samples by reason, selected)
        ("LDC R1, c[0x0][0x28]", 4, 7, dict(wait=7), 0),  # once per program: not the loop
        ("@!P0 LOP3.LUT R4, R5, 0x3, R6, 0xea, !PT", 400, 10, dict(wait=4), 6),
        ("LOP3.LUT R7, R5, 0xc, R6, 0xea, !PT", 400, 3, {}, 3),
        ("FFMA R8, R7, R9, R8", 400, 12, dict(short_sb=9), 3),
        ("BAR.SYNC.DEFER_BLOCKING 0x1, 0x80", 400, 5, dict(barrier=5), 0),
        ("@P1 SHFL.BFLY PT, R10, R8, 0x4, 0x1f", 200, 2, {}, 2),  # half the trips: counted
        ("EXIT", 190, 1, {}, 1),  # under half: not the loop
    ]
    path = tmp_path / "src.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "k"])
        w.writerow(header)
        for i, (src, n, s, st, sel) in enumerate(rows):
            all_ = [sel if r == "selected" else st.get(r, 0) for r in reasons]
            w.writerow([hex(i), src, s, n] + all_ + [st.get(r, 0) for r in reasons])
    out = ncu_summary.summarize(*ncu_summary.read_source(path))
    assert out["loop_trip_per_warp"] == 400
    cls = out["classes"]
    assert cls["unpack and bit ops"]["instructions"] == 2.0
    assert cls["unpack and bit ops"]["stalls"] == {"wait": 4, "selected": 9}
    assert cls["float math"]["stalls"] == {"short_sb": 9, "selected": 3}
    assert cls["barriers and copies"]["stalls"] == {"barrier": 5}
    assert cls["shuffles"]["instructions"] == 0.5
    assert out["loop_instructions_per_warp_and_block"] == 4.5
    assert out["stalls"]["selected"] == 14 and out["stalls"]["wait"] == 4
    assert out["loop_share_of_samples"] == round(32 / 40, 3)
    assert "control flow" not in cls and "moves and predicates" not in cls
    assert ncu_summary.opcode("@!UP2 UTMALDG.4D [UR8], [UR24]") == "UTMALDG"
    assert "| loop | 4 |" in ncu_summary.table(out).replace("4.5", "4")  # rounded in the table


def test_ncu_summary_reads_the_details_page(tmp_path):
    """ncu_summary.read_details: the named metrics with their units, and the profiled device's
    compute capability from the page's CC column; other metrics are left out."""
    import ncu_summary

    path = tmp_path / "details.csv"
    head = ["ID", "Kernel Name", "Device", "CC", "Section Name", "Metric Name", "Metric Unit",
            "Metric Value"]
    rows = [["0", "k", "0", "9.0", "SOL", "Duration", "us", "105.15"],
            ["0", "k", "0", "9.0", "SOL", "Elapsed Cycles", "cycle", "185000"],
            ["0", "k", "0", "9.0", "Occ", "Registers Per Thread", "register/thread", "168"]]
    path.write_text("\n".join(",".join(f'"{x}"' for x in r) for r in [head] + rows) + "\n")
    out = ncu_summary.read_details(path)
    assert out == {"Compute Capability": ("9.0", ""), "Duration": ("105.15", "us"),
                   "Registers Per Thread": ("168", "register/thread")}

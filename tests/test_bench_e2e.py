"""The end-to-end benchmark script runs (CPU smoke run of its quick suite).

Speed is never asserted here; what is checked is that every row the GPU run would
write is complete and consistent: a time, tokens/s matching it, the roofline from
the bytes and the measured bandwidth, and the attention time beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_e2e  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.slow  # a minute of compiles on two cores
def test_quick_suite_writes_complete_rows(tmp_path):
    bench_e2e.main(["--suite", "quick", "--out", str(tmp_path), "--steps", "2", "--reps", "1"])
    doc = json.loads((tmp_path / "e2e_quick.json").read_text())
    bw = doc["meta"]["copy_bandwidth"]
    assert bw > 0 and (tmp_path / "e2e_quick.png").exists()
    assert [r["cache"] for r in doc["rows"]] == ["bf16", "int8", "outerq2", "innerq2",
                                                 "recommended"]
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["schema"] == bench_e2e.ROW_SCHEMA and r["backend"] == "cpu"
        assert abs(r["tokens_per_s"] - r["B"] / (r["step_ms"] / 1e3)) < 1e-6 * r["tokens_per_s"]
        roof = (r["weight_bytes"] + r["cache_bytes"]) / bw * 1e3
        assert abs(r["roofline_ms"] - roof) < 1e-9 * roof
        assert r["attention_ms_all_layers"] == r["attention_ms_per_layer"] * 2  # 2 layers
        assert r["cache_bytes"] == r["B"] * r["cache_bytes_per_seq"]
    by = {r["cache"]: r["cache_bytes_per_seq"] for r in doc["rows"]}
    assert by["innerq2"] < by["int8"] < by["bf16"]


@pytest.mark.slow  # compiles of three step forms
def test_call_modes_label_rows_and_record_the_host(tmp_path):
    """--call bound,module,loop: one row per form, labelled, each with its host figures;
    --hlo writes the compiled step (its text names the entry computation)."""
    import gzip

    bench_e2e.main(["--suite", "quick", "--only", "innerq2:2", "--call", "bound,module,loop",
                    "--hlo", "--out", str(tmp_path), "--steps", "4", "--reps", "1"])
    rows = json.loads((tmp_path / "e2e_quick.json").read_text())["rows"]
    assert [r["cache"] for r in rows] == ["innerq2", "innerq2@module", "innerq2@loop"]
    assert [r["step_call"] for r in rows] == ["bound", "module", "loop"]
    for r in rows:
        assert "error" not in r, r
        assert r["host_call_ms"] > 0 and r["host_flatten_ms"] > 0
    # the module is walked on every call; the bound step's flat list is not
    assert rows[1]["host_flatten_ms"] > rows[0]["host_flatten_ms"]
    for call in ("bound", "module", "loop"):
        text = gzip.open(tmp_path / "hlo" / f"e2e_innerq2_{call}_B2.hlo.gz", "rt").read()
        assert "ENTRY" in text


def test_long_suite_is_one_stream_at_128k():
    rows = bench_e2e.suite_rows("long")
    assert {k for k, _, _ in rows} == {"bf16", "innerq2", "recommended", "outerq2"}
    assert all(B == 1 and ctx == 131072 for _, B, ctx in rows)
    assert all(k in bench_e2e.KINDS for k, _, _ in rows)
    with pytest.raises(ValueError, match="long"):
        bench_e2e.suite_rows("longest")


def test_default_model_suites_are_its_short_contexts():
    """short: B 1 at 1k and 4k, B 8 at 8k, each for bf16, InnerQ and the recommended cache;
    cli: what `innerq generate` runs (one stream, a 1024-token cache)."""
    rows = bench_e2e.suite_rows("short")
    assert sorted({(B, ctx) for _, B, ctx in rows}) == [(1, 1024), (1, 4096), (8, 8192)]
    assert {k for k, _, _ in rows} == {"bf16", "innerq2", "recommended"} and len(rows) == 9
    assert bench_e2e.suite_rows("cli") == [(k, 1, 1024) for k in ("bf16", "innerq2",
                                                                 "recommended")]
    assert all(k in bench_e2e.KINDS for k, _, _ in rows)


def test_host_summary_sums_host_events_and_leaves_devices_out(tmp_path):
    """trace_summary.host_summary: the host threads' complete events summed by name per
    step (count, ms), costliest first; a device's events and unfinished events are not
    counted."""
    import gzip

    import trace_summary

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "Execute", "ts": 0, "dur": 3000},
        {"ph": "X", "pid": 1, "name": "Execute", "ts": 5000, "dur": 1000},
        {"ph": "X", "pid": 1, "name": "command_buffer::update", "ts": 100, "dur": 500},
        {"ph": "X", "pid": 1, "name": "no duration", "ts": 100},
        {"ph": "X", "pid": 2, "name": "kernel", "ts": 0, "dur": 9000},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = trace_summary.host_summary(str(path), steps=2)
    assert list(got) == ["Execute", "command_buffer::update"]
    assert got["Execute"] == [1.0, 2.0]  # two events over two steps, 4 ms in all
    assert got["command_buffer::update"] == [0.5, 0.25]
    # the device side is summarize's, unchanged: the GPU's kernel only
    dev = trace_summary.summarize(str(path), steps=2)
    assert list(dev) == ["/device:GPU:0"] and dev["/device:GPU:0"]["ops"] == 0.5


def test_summarize_puts_each_idle_gap_on_the_op_that_ends_it(tmp_path):
    """trace_summary.summarize's idle_before: the device's idle time between one op's end
    and the next op's start, summed per step under the name of the op that ends the gap;
    overlapping ops (two streams) leave no gap, and idle + busy is the span."""
    import gzip

    import trace_summary

    gpu = {"ph": "X", "pid": 2}
    events = [  # us; two steps of query (3) -> kernel (50) -> epilogue (10)
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        dict(gpu, name="query", ts=0, dur=3), dict(gpu, name="kernel", ts=7, dur=50),
        dict(gpu, name="epilogue", ts=57, dur=10), dict(gpu, name="side", ts=60, dur=20),
        dict(gpu, name="query", ts=100, dur=3), dict(gpu, name="kernel", ts=115, dur=50),
        dict(gpu, name="epilogue", ts=165, dur=10),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    dev = trace_summary.summarize(str(path), steps=2)["/device:GPU:0"]
    # gaps: 4 before the first kernel, 12 for the kernel after the second query, 20 before the
    # second query (the side op, overlapping the first epilogue, ended at 80)
    assert dev["idle_before"] == {"query": 0.01, "kernel": 0.008}
    assert list(dev["idle_before"]) == ["query", "kernel"]
    assert abs(dev["span_ms"] - dev["busy_ms"] - sum(dev["idle_before"].values())) < 1e-9


def test_host_overhead_layouts_update_the_same_rows(tmp_path, monkeypatch):
    """host_overhead.py: its check passes every layout's step (one added to row t of each
    random array, nothing else) and fails a step that updates another row; a run writes one
    row per (size, layout) with its figures."""
    import host_overhead
    import jax
    import numpy as np

    for layout in ("donated", "copied", "stacked"):
        host_overhead.check(3, layout)  # raises where a row other than t changed, or t did not
        xs = host_overhead.inputs(3, layout, jax.random.PRNGKey(7))
        rows = np.stack([np.asarray(x, np.float32) for x in xs])
        assert not np.array_equal(rows[:, :, :, 5], rows[:, :, :, 6])  # random, distinct rows
    right = host_overhead.step  # a step that updates the wrong row must fail the check
    monkeypatch.setattr(host_overhead, "step",
                        lambda n, layout: lambda xs, t: right(n, layout)(xs, t + 1))
    with pytest.raises(AssertionError, match="step of 3 arrays is wrong"):
        host_overhead.check(3, "copied")
    monkeypatch.setattr(host_overhead, "step", right)
    host_overhead.main(["--sizes", "2,4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert [(r["rows"], r["layout"]) for r in rows] == [
        (n, lay) for n in (2, 4) for lay in ("donated", "copied", "stacked")]
    for r in rows:
        assert r["call_us"] > 0 and r["per_call_us"] > 0
        assert r["arrays"] == (1 if r["layout"] == "stacked" else r["rows"])
        assert abs(r["per_array_us"] - r["per_call_us"] / r["arrays"]) < 1e-9 * r["per_call_us"]


@pytest.mark.slow  # four compiles of the generation loop
def test_bench_generate_times_the_loop_by_two_runs_difference(tmp_path, monkeypatch):
    """bench_generate.py: a row per cache with its time per token from the difference of a
    12- and a 4-token run (--short, default --new // 3) timed back to back in pairs (the
    median over the pairs, their range beside it), the fixed cost the runs share, the
    standalone prefill and the HBM floor of each cache's own bytes; a table and a plot; a
    short run whose tokens are not the long run's first ones stops the benchmark."""
    import bench_generate

    bench_generate.main(["--model", "tiny", "--caches", "bf16,innerq2", "--prompt", "40",
                         "--new", "12", "--reps", "2", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "generate_tiny.json").read_text())
    assert (tmp_path / "generate_tiny.png").exists()
    assert [r["cache"] for r in doc["rows"]] == ["bf16", "innerq2"]
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["short"] == 4 and r["prefill_ms"] > 0
        pairs = r["ms_per_token_pairs"]
        assert len(pairs) == 2 and r["ms_per_token_range"] == [min(pairs), max(pairs)]
        want = (pairs[0] + pairs[1]) / 2  # the median of two
        assert abs(r["ms_per_token"] - want) < 1e-9 * max(1.0, abs(want))
        fixed = r["short_run_ms"] - 3 * r["ms_per_token"]
        assert abs(r["fixed_ms"] - fixed) < 1e-9 * max(1.0, abs(fixed))
        floor = (r["weight_bytes"] + r["cache_bytes"]) / doc["meta"]["copy_bytes_per_s"] * 1e3
        assert r["cache_bytes"] > 0 and abs(r["roofline_ms"] - floor) < 1e-9 * floor
    by = {r["cache"]: r["cache_bytes"] for r in doc["rows"]}
    assert by["innerq2"] < by["bf16"]  # the floor counts each cache's own bytes
    for bad in ("12", "0", "-1"):  # --short must lie in [1, --new)
        with pytest.raises(SystemExit):
            bench_generate.main(["--model", "tiny", "--new", "12", "--short", bad,
                                 "--out", str(tmp_path)])
    real = bench_generate._run_s

    def wrong_short(model, ids, cfg, new, sink, fold=True):  # the short run's text differs
        t, c, toks = real(model, ids, cfg, new, sink, fold)
        return t, c, (toks + 1 if new == 4 else toks)

    monkeypatch.setattr(bench_generate, "_run_s", wrong_short)
    with pytest.raises(SystemExit, match="first ones"):
        bench_generate.main(["--model", "tiny", "--caches", "bf16", "--prompt", "40",
                             "--new", "12", "--reps", "1", "--out", str(tmp_path)])


@pytest.mark.slow  # compiles of the recommended cache's step and loop, folded and not
def test_fold_options_label_rows(tmp_path):
    """bench_e2e.py --fold-values on,off: the recommended cache's row twice, the unfolded one
    labelled kind~unfolded and flagged; bench_generate.py KIND~unfolded runs generate
    unfolded beside the folded row, and a kind with an unknown suffix is refused."""
    import bench_generate

    bench_e2e.main(["--suite", "quick", "--only", "recommended:2", "--call", "loop",
                    "--fold-values", "on,off", "--out", str(tmp_path), "--steps", "2",
                    "--reps", "1"])
    rows = json.loads((tmp_path / "e2e_quick.json").read_text())["rows"]
    assert [r["cache"] for r in rows] == ["recommended@loop", "recommended~unfolded@loop"]
    assert [r["values_folded"] for r in rows] == [True, False]
    assert all("error" not in r for r in rows), rows
    bench_generate.main(["--model", "tiny", "--caches", "recommended,recommended~unfolded",
                         "--prompt", "40", "--new", "6", "--reps", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "generate_tiny.json").read_text())
    assert [r["cache"] for r in doc["rows"]] == ["recommended", "recommended~unfolded"]
    assert all("error" not in r for r in doc["rows"]), doc["rows"]
    with pytest.raises(SystemExit):
        bench_generate.main(["--model", "tiny", "--caches", "recommended~other",
                             "--out", str(tmp_path)])

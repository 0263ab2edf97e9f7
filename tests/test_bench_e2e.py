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
    assert [r["cache"] for r in doc["rows"]] == ["bf16", "int8", "outerq2", "innerq2"]
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

"""The append benchmark runs (CPU smoke run: XLA's scatters against the interpreted kernel).

Speed is never asserted; what is checked is that each variant is checked before it is
timed and that its row is complete: the check passed, groups were really flushed, and
a time per append.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_append  # noqa: E402


def test_smoke_run_checks_and_times_each_variant(tmp_path):
    bench_append.main(["--out", str(tmp_path), "--tag", "t", "--batch", "2", "--context",
                       "1024", "--layers", "2", "--reps", "1", "--configs", "innerq"])
    rows = json.loads((tmp_path / "append_t.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["scatter", "interpret"]
    assert rows[0]["check"] == "reference" and rows[1]["check"] == "ok"
    assert rows[1]["hybrid_flips"] == [0.0, 0.0]  # interpret mode: bit for bit
    for r in rows:
        assert r["flushed_scales"] > 0 and r["us_per_append"] > 0

"""The append benchmark runs (CPU smoke run: XLA's scatters against the interpreted kernel).

Speed is never asserted; what is checked is that each variant is checked before it is
timed and that its row is complete: the check passed, groups were really flushed, a time
per append and the roofline from the bytes the append moves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_append  # noqa: E402


def test_smoke_run_checks_and_times_each_variant(tmp_path):
    bench_append.main(["--out", str(tmp_path), "--tag", "t", "--batch", "2", "--context",
                       "1024", "--layers", "2", "--reps", "1", "--configs", "innerq",
                       "--bandwidth-mb", "16"])
    doc = json.loads((tmp_path / "append_t.json").read_text())
    rows, bw = doc["rows"], doc["meta"]["copy_bandwidth"]
    assert [r["variant"] for r in rows] == ["scatter", "interpret"]
    assert rows[0]["check"] == "reference" and rows[1]["check"] == "ok"
    assert rows[1]["hybrid_flips"] == [0.0, 0.0]  # interpret mode: bit for bit
    for r in rows:
        assert r["flushed_scales"] > 0 and r["us_per_append"] > 0
        # B 2 x 8 heads: K and V's 32 ring rows of 128 bf16 and the token's row; per
        # (sequence, head) a flushed group's fields: keys 32 rows of 8 code words, 32 x 4
        # bf16 scales and zero-points, one mask row of 4 words; values 2 rows of 128 code
        # words, 128 scales and zero-points, 4 mask words
        ring = 2 * (2 * 8) * 33 * 128 * 2
        keys = 32 * 8 * 4 + 2 * 32 * 4 * 2 + 4 * 4
        values = 2 * 128 * 4 + 2 * 128 * 2 + 4 * 4
        assert r["bytes_moved"] == ring + (2 * 8) * (keys + values)
        assert abs(r["roofline_us"] - r["bytes_moved"] / bw * 1e6) < 1e-9 * r["roofline_us"]

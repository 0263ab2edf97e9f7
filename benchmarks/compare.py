"""Side-by-side comparison of kernel benchmark files from different devices.

    python benchmarks/compare.py A.json B.json [C.json ...] [--out PREFIX] [--all-variants]

Reads files written by ``bench_kernels.py`` (the flat ``rows`` of ROW_SCHEMA, or
the older ``runs``-only files, converted here) and prints, per shape and per
stored format (bf16, int8, OuterQ, InnerQ, InnerQ-H), the fastest variant of
each file: time, effective bandwidth (bytes the variant must read / time),
speed-up over that device's fastest bf16 path at that shape, and the fraction
of that device's roofline (the device's copy bandwidth, measured by the run
itself, or a documented figure for older files). Writes PREFIX.txt (the table)
and PREFIX.png (the four measures against the shape's bf16 cache bytes, so
shapes of different suites share one axis).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Roofline bandwidths for files that did not measure one (GB/s, and where it comes from).
KNOWN_ROOFLINES = {
    "NVIDIA H200": (4300.0, "device-to-device copy measured on the H200, shared/docs/benchmarks.md"),
    "TPU v5 lite": (819.0, "HBM spec, cloud.google.com/tpu/docs/v5e"),
    "TPU v5e": (819.0, "HBM spec, cloud.google.com/tpu/docs/v5e"),
    "TPU v6 lite": (1640.0, "HBM spec, cloud.google.com/tpu/docs/v6e"),
    "TPU v6e": (1640.0, "HBM spec, cloud.google.com/tpu/docs/v6e"),
}
BF16_PEERS = ("bf16_xla", "bf16_pallas", "cudnn", "bf16_paged_tpu")
FAMILY_ORDER = ("bf16", "int8", "outerq", "innerq", "innerq-h")


def variant_family(name: str) -> str:
    """bf16 / int8 / innerq / outerq / innerq-h: what a variant stores, whatever runs it."""
    base = name.split("@")[0]
    if base in BF16_PEERS:
        return "bf16"
    if base.startswith("int8"):
        return "int8"
    if base.startswith("kernel_"):
        return "innerq-part"  # key scores or value sums alone, not whole attention
    return base.rsplit("_", 1)[0]


def _rows_from_runs(doc) -> list[dict]:
    """Flat rows from a file written before ROW_SCHEMA (``meta`` + ``runs`` only)."""
    meta = doc["meta"]
    rows = []
    for run in doc.get("runs", []):
        sh = run["shape"]
        for name, res in run["results"].items():
            rows.append({
                "device_kind": meta["device_kind"],
                "backend": meta.get("backend", meta.get("platform")), "jax": meta["jax"],
                "shape": sh["label"], "B": sh["B"], "T": sh["T"], "Hq": sh["Hq"],
                "Hkv": sh["Hkv"], "D": sh["D"], "bits": sh["bits"], "G": sh["G"],
                "variant": name, "family": variant_family(name), "bf16_peer": name in BF16_PEERS,
                "ms": res.get("ms"), "bytes": res.get("bytes"), "gbps": res.get("gbps"),
                "rel_err": res.get("rel_err"), "error": res.get("error"),
            })
    return rows


class BenchFile:
    def __init__(self, path: str):
        with open(path) as f:
            doc = json.load(f)
        if "meta" not in doc:
            raise SystemExit(f"{path}: not a bench_kernels.py file (no 'meta')")
        self.path, self.meta = path, doc["meta"]
        self.converted = "rows" not in doc
        self.rows = _rows_from_runs(doc) if self.converted else doc["rows"]
        for r in self.rows:
            r.setdefault("family", variant_family(r["variant"]))
        kind = self.meta["device_kind"]
        if self.meta.get("copy_gbps"):
            self.roof, self.roof_src = self.meta["copy_gbps"], "device copy measured by this run"
        elif kind in KNOWN_ROOFLINES:
            self.roof, self.roof_src = KNOWN_ROOFLINES[kind]
        elif self.meta.get("peak_hbm_gbps"):
            self.roof, self.roof_src = self.meta["peak_hbm_gbps"], "spec HBM bandwidth (jax tpu_info)"
        else:
            self.roof, self.roof_src = None, "unknown"
        backend = self.meta.get("backend", self.meta.get("platform"))
        self.label = f"{kind} ({backend}, jax {self.meta['jax']})"
        self.short = os.path.splitext(os.path.basename(path))[0]

    def shapes(self) -> dict[str, dict]:
        out = {}
        for r in self.rows:
            out.setdefault(r["shape"], r)
        return out

    def best_bf16_ms(self, shape: str):
        ms = [r["ms"] for r in self.rows if r["shape"] == shape and r.get("bf16_peer") and r["ms"]]
        return min(ms) if ms else None

    def measures(self, r) -> dict:
        """ms, GB/s, speed-up over this device's fastest bf16 path, fraction of roofline."""
        best = self.best_bf16_ms(r["shape"])
        return {
            "ms": r["ms"], "gbps": r["gbps"],
            "speedup": best / r["ms"] if best and r["ms"] else None,
            "roof": r["gbps"] / self.roof if self.roof and r["gbps"] else None,
        }

    def best_of_family(self, shape: str, family: str):
        rows = [r for r in self.rows if r["shape"] == shape and r["family"] == family and r["ms"]]
        return min(rows, key=lambda r: r["ms"]) if rows else None


def _bf16_cache_mb(sh: dict) -> float:
    return sh["B"] * sh["Hkv"] * sh["T"] * sh["D"] * 2 * 2 / 1e6


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _fmt_gbps(v):
    if v is None:
        return "-"
    return f"{v:6.0f}" if v >= 100 else f"{v:6.1f}" if v >= 1 else f"{v:6.2f}"


def table(files: list[BenchFile], all_variants: bool) -> str:
    lines = []
    for i, f in enumerate(files):
        roof = f"{f.roof:.0f} GB/s" if f.roof else "unknown"
        note = " (older file: rows converted from 'runs')" if f.converted else ""
        lines.append(f"[{i}] {f.path}: {f.label}, {len(f.rows)} rows{note}; "
                     f"roofline {roof} ({f.roof_src})")
    lines.append("")
    lines.append("Per cell: ms | effective GB/s | speed-up over the device's fastest bf16 path at "
                 "that shape | % of the device's roofline. Rows: the fastest variant of each "
                 "stored format" + (" (and every variant)" if all_variants else "") + ".")
    lines.append("")
    shapes = {}
    for f in files:
        for name, sh in f.shapes().items():
            shapes.setdefault(name, sh)
    order = sorted(shapes, key=lambda n: (_bf16_cache_mb(shapes[n]), n))
    width = 45
    head = f"{'shape':34s} {'format':10s}" + "".join(f" {f'[{i}]':>{width}s}" for i in range(len(files)))
    lines.append(head)
    lines.append("-" * len(head))
    for name in order:
        keys = []
        for fam in FAMILY_ORDER:
            keys.append((fam, None))
            if all_variants:
                vs = sorted({r["variant"] for f in files for r in f.rows
                             if r["shape"] == name and r["family"] == fam})
                keys += [(fam, v) for v in vs]
        for fam, variant in keys:
            cells, any_value = [], False
            for f in files:
                if variant is None:
                    r = f.best_of_family(name, fam)
                else:
                    r = next((x for x in f.rows if x["shape"] == name and x["variant"] == variant
                              and x["ms"]), None)
                if r is None:
                    cells.append("")
                    continue
                any_value = True
                m = f.measures(r)
                sp = _fmt(m["speedup"], ".2f") + "x" if m["speedup"] else "-"
                roof = _fmt(100 * m["roof"], ".0f") + "%" if m["roof"] else "-"
                tag = r["variant"] if variant is None else ""
                cell = (f"{m['ms']:9.4f} {_fmt_gbps(m['gbps'])} {sp:>6s} {roof:>5s} "
                        f"{tag:<15s}")
                cells.append(cell[:width])
            if any_value:
                label = fam if variant is None else f"  {variant}"
                lines.append(f"{name:34s} {label:10s}" + "".join(f" {c:>{width}s}" for c in cells))
    failed = [(i, r["shape"], r["variant"], r["error"]) for i, f in enumerate(files)
              for r in f.rows if r.get("error")]
    if failed:
        lines.append("")
        lines.append("Variants that did not run:")
        for i, shape, variant, err in failed:
            lines.append(f"  [{i}] {shape} {variant}: {str(err)[:120]}")
    return "\n".join(lines)


def plot(files: list[BenchFile], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [("ms", "time per call (ms)", True), ("gbps", "effective bandwidth (GB/s)", True),
              ("speedup", "speed-up over the device's fastest bf16 path", False),
              ("roof", "fraction of the device's roofline", False)]
    colors = {"bf16": "tab:gray", "int8": "tab:olive", "outerq": "tab:blue", "innerq": "tab:red",
              "innerq-h": "tab:orange"}
    markers = ["o", "s", "^", "D", "v", "P"]
    for (key, title, logy), ax in zip(panels, axes.flat):
        for i, f in enumerate(files):
            for fam in FAMILY_ORDER:
                pts = []
                for shape, sh in f.shapes().items():
                    r = f.best_of_family(shape, fam)
                    if r is None:
                        continue
                    v = f.measures(r)[key]
                    if v is not None:
                        pts.append((_bf16_cache_mb(sh), v))
                if not pts:
                    continue
                pts.sort()
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors.get(fam, "k"),
                           marker=markers[i % len(markers)], s=36, alpha=0.85,
                           label=f"[{i}] {fam}")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if key in ("speedup", "roof"):
            ax.axhline(1.0, color="gray", lw=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("bf16 K+V cache bytes of the shape (MB)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("   vs   ".join(f"[{i}] {f.label}" for i, f in enumerate(files)), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="bench_kernels.py JSON files (two or more)")
    ap.add_argument("--out", default=None,
                    help="output prefix for .txt and .png (default: compare_<A>_vs_<B> beside A)")
    ap.add_argument("--all-variants", action="store_true", help="list every variant too")
    args = ap.parse_args(argv)
    if len(args.files) < 2:
        ap.error(f"need at least two files to compare, got {len(args.files)}")
    files = [BenchFile(p) for p in args.files]
    out = args.out or os.path.join(os.path.dirname(args.files[0]) or ".",
                                   "compare_" + "_vs_".join(f.short for f in files))
    text = table(files, args.all_variants)
    print(text)
    with open(out + ".txt", "w") as f:
        f.write(text + "\n")
    wrote = plot(files, out + ".png")
    print(f"\nwrote {out}.txt" + (f" and {out}.png" if wrote else " (matplotlib missing: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the fused kernel's issue slots go: Nsight Compute's per-instruction source page
(``ncu --page source --csv --print-source sass``, as ``ncu_probe.sh`` writes it) summed
over the kernel's main loop, by instruction class and by stall reason.

The main loop is taken as the instructions executed at least ``--loop-frac`` of the
most-executed instruction's count (the loop body runs once per block and warp; the
prologue, the epilogue and the copy ring's start run once per program). For each class:
instructions per warp and block (executions / the loop's trip count per warp), and the
warp-state samples that sat on those instructions, split by reason ("selected" is an
issue, every other reason a cycle the warp could not issue).

    python3 benchmarks/ncu_summary.py results/ncu/ncu_mgpu_source.csv.gz \
        --details results/ncu/ncu_mgpu_details.csv --out results/ncu/ncu_mgpu_summary
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import re
from pathlib import Path

# SASS opcode (before the first '.') -> class
CLASSES = {
    "unpack and bit ops": ("LOP3", "SHF", "PRMT", "LOP", "SHL", "SHR", "BFE", "BFI"),
    "float math": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "F2FP", "F2F", "HADD2",
                   "HMUL2", "HFMA2", "FCHK", "FSWZADD"),
    "exp2 (MUFU)": ("MUFU",),
    "integer and index": ("IMAD", "IADD3", "ISETP", "IMNMX", "LEA", "SEL", "ISCADD", "IABS",
                          "I2F", "F2I", "POPC", "FLO", "VIADD", "VIMNMX", "IADD"),
    "shared memory": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "global memory": ("LDG", "STG", "LD", "ST", "RED", "ATOM", "ATOMG"),
    "shuffles": ("SHFL",),
    "wgmma and descriptors": ("HGMMA", "WARPGROUP", "R2UR", "UMOV", "UIADD3", "ULOP3", "USHF",
                              "UIMAD", "ULEA", "UISETP", "USEL", "UPRMT", "ULDC", "S2UR",
                              "UPLOP3", "USETMAXREG", "UFLO", "UPOPC", "UBMSK", "UMEMSETS"),
    "barriers and copies": ("BAR", "B2R", "SYNCS", "UTMALDG", "UTMASTG", "UBLKCP", "MEMBAR", "FENCE",
                            "ERRBAR", "CCTL", "DEPBAR", "UCGABAR_ARV",
                            "UCGABAR_WAIT", "ELECT", "UTMACCTL", "UTMAPF"),
    "moves and predicates": ("MOV", "S2R", "CS2R", "PLOP3", "P2R", "R2P", "VOTE", "VOTEU",
                             "MATCH", "NOP", "LDC"),
    "control flow": ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "YIELD", "JMP", "BREAK",
                     "WARPSYNC", "BMOV", "NANOSLEEP"),
}
_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}
assert len(_OF) == sum(map(len, CLASSES.values())), "an opcode in two classes"


def opcode(sass: str) -> str:
    """'@!P0 LOP3.LUT R1, ...' -> 'LOP3'."""
    s = sass.strip()
    s = re.sub(r"^@!?U?P[T0-9]+\s+", "", s)
    return s.split(None, 1)[0].split(".", 1)[0] if s else ""


def classify(op: str) -> str:
    return _OF.get(op, "other")


def read_source(path: Path) -> tuple[list[str], list[list[str]]]:
    """The source page's header and rows (the kernel-name line before the header skipped)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]


def summarize(header: list[str], rows: list[list[str]], loop_frac: float = 0.5) -> dict:
    """Per class in the loop: instructions per warp and block, and stall samples by reason
    (the not-issued columns, plus "selected" from the all-samples columns)."""
    col = {name: i for i, name in enumerate(header)}
    ex = col["Instructions Executed"]
    counts = [int(float(r[ex] or 0)) for r in rows]
    trip = max(counts)
    if trip <= 0:
        raise ValueError("no instruction executed: is this the source page of a profiled kernel?")
    reasons = [h[len("stall_"):-len(" (Not Issued)")] for h in header
               if h.startswith("stall_") and h.endswith("(Not Issued)")]
    by_class: dict = collections.defaultdict(lambda: {"instructions": 0.0, "stalls": collections.Counter()})
    by_op: collections.Counter = collections.Counter()
    loop_samples = total_samples = 0
    for r, c in zip(rows, counts):
        op = opcode(r[col["Source"]])
        samples = int(float(r[col["Warp Stall Sampling (All Samples)"]] or 0))
        total_samples += samples
        if c < loop_frac * trip:
            continue
        loop_samples += samples
        entry = by_class[classify(op)]
        entry["instructions"] += c / trip
        by_op[op] += c / trip
        for reason in reasons:
            v = int(float(r[col[f"stall_{reason} (Not Issued)"]] or 0))
            if v:
                entry["stalls"][reason] += v
        selected = int(float(r[col["stall_selected"]] or 0))
        if selected:
            entry["stalls"]["selected"] += selected
    classes = {k: {"instructions": round(v["instructions"], 1), "stalls": dict(v["stalls"])}
               for k, v in sorted(by_class.items(), key=lambda kv: -kv[1]["instructions"])}
    stall_tot = collections.Counter()
    for v in classes.values():
        stall_tot.update(v["stalls"])
    return {
        "loop_trip_per_warp": trip,
        "loop_instructions_per_warp_and_block": round(sum(v["instructions"] for v in classes.values()), 1),
        "loop_share_of_samples": round(loop_samples / max(total_samples, 1), 3),
        "classes": classes,
        "stalls": dict(stall_tot.most_common()),
        "top_opcodes": {k: round(v, 1) for k, v in by_op.most_common(20)},
    }


DETAILS = ("Duration", "Registers Per Thread", "Achieved Occupancy", "Issue Slots Busy",
           "Issued Ipc Active", "No Eligible", "Eligible Warps Per Scheduler",
           "Warp Cycles Per Issued Instruction", "Executed Instructions", "DRAM Throughput",
           "SM Frequency")


def read_details(path: Path) -> dict:
    """The named metrics of ncu's details page (CSV): {name: (value, unit)}."""
    out = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next((r for r in rows if "Metric Name" in r), None)
    if head is None:
        return out
    name_i, unit_i, val_i = (head.index(k) for k in ("Metric Name", "Metric Unit", "Metric Value"))
    data = [r for r in rows[rows.index(head) + 1:] if len(r) > val_i]
    if data and "CC" in head:  # the profiled device's compute capability
        out["Compute Capability"] = (data[0][head.index("CC")], "")
    for r in rows:
        if len(r) > val_i and r[name_i] in DETAILS:
            out[r[name_i]] = (r[val_i], r[unit_i])
    return out


def table(summary: dict) -> str:
    reasons = list(summary["stalls"])[:8]
    lines = ["| class | instr / warp / block | " + " | ".join(reasons) + " |",
             "| --- | --- | " + " | ".join("---" for _ in reasons) + " |"]
    tot = sum(summary["stalls"].values()) or 1
    for name, v in summary["classes"].items():
        cells = [f"{100 * v['stalls'].get(r, 0) / tot:.1f}%" for r in reasons]
        lines.append(f"| {name} | {v['instructions']:.0f} | " + " | ".join(cells) + " |")
    cells = [f"{100 * summary['stalls'][r] / tot:.1f}%" for r in reasons]
    lines.append(f"| loop | {summary['loop_instructions_per_warp_and_block']:.0f} | "
                 + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reasons = list(summary["stalls"])[:8]
    names = list(summary["classes"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    a1.barh(names, [summary["classes"][n]["instructions"] for n in names], color="tab:blue")
    a1.invert_yaxis()
    a1.set_xlabel("instructions per warp and 128-token block")
    left = [0.0] * len(names)
    tot = sum(summary["stalls"].values()) or 1
    for reason in reasons:
        vals = [100 * summary["classes"][n]["stalls"].get(reason, 0) / tot for n in names]
        a2.barh(names, vals, left=left, label=reason)
        left = [x + y for x, y in zip(left, vals)]
    a2.invert_yaxis()
    a2.set_yticks([])
    a2.set_xlabel("% of the loop's warp-state samples")
    a2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="ncu source page CSV (.csv or .csv.gz)")
    ap.add_argument("--details", type=Path, help="ncu details page CSV of the same launch")
    ap.add_argument("--loop-frac", type=float, default=0.5)
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    ap.add_argument("--title", default="fused InnerQ kernel, B 8 / 32k (H200)")
    ap.add_argument("--device", default=None,
                    help="the GPU's name (nvidia-smi), recorded in the JSON: ncu's pages name "
                         "only its index and compute capability")
    a = ap.parse_args()
    summary = summarize(*read_source(a.source), loop_frac=a.loop_frac)
    if a.device:
        summary["device"] = a.device
    if a.details:
        summary["details"] = read_details(a.details)
    print(table(summary))
    print("top opcodes:", summary["top_opcodes"])
    for k, v in summary.get("details", {}).items():
        print(f"  {k}: {v[0]} {v[1]}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        plot(summary, a.out.with_suffix(".png"), a.title)


if __name__ == "__main__":
    main()

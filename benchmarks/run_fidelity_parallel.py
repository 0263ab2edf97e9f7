"""A fidelity set's perplexity on several texts, one process per configuration.

``innerq eval ppl`` compiles every configuration of a set into one program, so a set of
eight 30-layer caches takes minutes to compile before the first token. Here each
configuration runs beside the reference (bf16, the set's first row) in its own process,
spread over the GPUs; a process scores every text in turn (the texts share its compiled
program). The per-configuration files are then merged into one file per text, the same
JSON / markdown / plot ``innerq eval ppl`` writes (stem ``fidelity_ppl_<tag>_<text>``).

    PYTHONPATH=$PWD python3 benchmarks/run_fidelity_parallel.py --set finalists3 \
        --model M.gguf --data-dir D --out OUT --gpus 2 --tag final
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import evaluate as ev  # noqa: E402

THIRD_TEXT = os.path.join(ROOT, "benchmarks", "data", "pride_and_prejudice_ch1.txt")
TEXTS = {"wiki": [], "gsm8k": ["--text", "gsm8k"], "third": ["--text", THIRD_TEXT]}


def worker(label: str, part: str, texts: list[str], common: list[str]) -> int:
    for t in texts:
        t0 = time.time()
        ev.main(["ppl", "--only", label, "--tag", part, *TEXTS[t], *common])
        print(f"[{part}] {label} on {t} in {time.time() - t0:.0f} s", flush=True)
    return 0


def merge(out: str, tag: str, parts: list[str], labels: list[str]) -> list[str]:
    """One file per text from the per-configuration files, rows in the set's order."""
    written = []
    texts = sorted({os.path.basename(p)[len(f"fidelity_ppl_{parts[0]}_"):-5]
                    for p in glob.glob(os.path.join(out, f"fidelity_ppl_{parts[0]}_*.json"))})
    for text in texts:
        rows, meta, secs = [], None, 0.0
        for part, label in zip(parts, labels):
            path = os.path.join(out, f"fidelity_ppl_{part}_{text}.json")
            if not os.path.exists(path):
                print(f"missing {path}: {label} on {text} did not finish", flush=True)
                continue
            payload = json.load(open(path))
            meta = meta or payload
            secs = max(secs, payload["seconds"])
            if not rows:
                rows.append(payload["rows"][0])  # the reference, from the first part
            rows += [r for r in payload["rows"][1:] if r["label"] == label]
        if meta is None:
            continue
        merged = dict(meta, rows=rows, seconds=secs,
                      title=f"decode perplexity, set {tag}, {meta['text']}",
                      note="one process per configuration (benchmarks/run_fidelity_parallel.py); "
                           "the reference row is the first process's; seconds is the slowest "
                           "process's")
        stem = f"fidelity_ppl_{tag}_{text}"
        ev._write(out, stem, merged, ev._ppl_table(merged))
        ev._plot(out, stem, merged)
        print(ev._ppl_table(merged), flush=True)
        written.append(stem)
        for part in parts:  # the merged file replaces the parts
            for ext in (".json", ".md", ".png"):
                p = os.path.join(out, f"fidelity_ppl_{part}_{text}{ext}")
                if os.path.exists(p):
                    os.remove(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="finalists3")
    ap.add_argument("--tag", default="final")
    ap.add_argument("--texts", default="wiki,gsm8k,third")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode", type=int, default=1024)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--worker", nargs=2, metavar=("LABEL", "PART"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    texts = a.texts.split(",")
    common = ["--set", a.set, "--windows", str(a.windows), "--decode", str(a.decode),
              "--data-dir", a.data_dir, "--out", a.out] + (["--model", a.model] if a.model else [])
    if a.worker:
        return worker(a.worker[0], a.worker[1], texts, common)
    labels = [label for label, _ in ev.named_set(a.set)][1:]
    parts = [f"{a.tag}part{i}" for i in range(len(labels))]
    procs = []
    for i, (label, part) in enumerate(zip(labels, parts)):
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        if a.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % a.gpus)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", label, part,
               *(sys.argv[1:] if argv is None else argv)]
        log = open(os.path.join(a.out, f"{part}.log"), "w")
        procs.append((label, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    t0 = time.time()
    failed = []
    for label, p in procs:
        rc = p.wait()
        print(f"{label}: rc={rc} ({time.time() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(label)
    merge(a.out, a.tag, parts, labels)
    if failed:
        print(f"failed: {failed} (their logs: {a.out}/{a.tag}part*.log)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

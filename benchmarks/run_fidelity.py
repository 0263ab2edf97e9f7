"""The whole fidelity plan on the real model, one step after another.

Each step is one ``innerq eval`` command (``models/evaluate.py``), given
``--data-dir`` (WikiText-2 and GSM8K; default ``../shared/data`` beside the
project) and ``--out`` (default ``benchmarks/results/``) explicitly; each writes
its JSON / markdown table / plot as soon as it finishes, so a partial run keeps
what it finished. Steps (``--steps``, comma-separated, in this order):

* ``check``: the ``main`` set on window 0 with 64 decode steps; run it on two
  devices (CPU here, GPU there) and compare the files to show both give the same
  numbers (``--compare``).
* ``main`` / ``main2``: the ``main`` set on WikiText-2 / on the second text
  (GSM8K train solutions as one document), ``--windows`` windows, P=512, Nd=1024.
* ``ablations`` / ``ablations2``: the InnerQ ablations on both texts.
* ``search``: inner-grouped 2-bit candidates at no more bytes than the
  paper-faithful configuration (``named_set("search")``) on WikiText-2; then
  ``search2`` runs the three best of them, with the bars, on the second text.
* ``search3`` / ``search3b``: issue 14's 2-bit search (``named_set("search3")``:
  fp8 scales with key groups of 16, other key / value groupings, randomized
  Hadamard signs, sink / recent sizes, all at <= 0.40 B/elem at 32k) on
  WikiText-2 / GSM8K solutions (``--search3-only`` keeps a subset).
* ``final`` / ``final2`` / ``final3``: the finalists of that search
  (``named_set("finalists3")``) with the bars on WikiText-2, GSM8K solutions and
  the third text (``benchmarks/data/pride_and_prejudice_ch1.txt``, committed with
  the repository, never tuned on), ``--windows`` windows each.
* ``gsm8k``: 8-shot CoT on the first ``--gsm8k-n`` test problems.
* ``passkey``: passkey retrieval at 1k, 2k and 4k tokens.

Then ``python benchmarks/fidelity_summary.py`` builds the summary tables.

Usage (CPU, hours):  .venv/bin/python benchmarks/run_fidelity.py
Usage (GPU machine): PYTHONPATH=$PWD python3 benchmarks/run_fidelity.py --model M.gguf \
                       --gen-batch 100
Finals (GPU machine): bash benchmarks/run_fidelity_gpu.sh run final,final2,final3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import evaluate as ev  # noqa: E402

STEPS = ("check", "main", "main2", "ablations", "ablations2", "search", "search2", "search3",
         "search3b", "final", "final2", "final3", "gsm8k", "passkey")
THIRD_TEXT = os.path.join(ROOT, "benchmarks", "data", "pride_and_prejudice_ch1.txt")
SEARCH_BARS = ("innerq2", "outerq2+sinks", "innerq-h2 keys+values")


def best_search_labels(results_dir: str, k: int = 3) -> list[str]:
    """The ``k`` lowest-perplexity candidates of the WikiText-2 search, bars excluded."""
    with open(os.path.join(results_dir, "fidelity_ppl_search_wiki.json")) as f:
        rows = json.load(f)["rows"]
    cands = [r for r in rows[1:] if r["label"] not in SEARCH_BARS]
    return [r["label"] for r in sorted(cands, key=lambda r: r["perplexity"])[:k]]


def compare(a_path: str, b_path: str, rtol: float = 0.01) -> bool:
    """Same perplexity (within ``rtol``) for every row of two ``check`` files."""
    with open(a_path) as f:
        a = {r["label"]: r["perplexity"] for r in json.load(f)["rows"]}
    with open(b_path) as f:
        b = {r["label"]: r["perplexity"] for r in json.load(f)["rows"]}
    ok = True
    for label in a:
        d = abs(a[label] / b[label] - 1)
        ok &= d <= rtol
        print(f"{label:28s} {a[label]:9.4f} {b[label]:9.4f}  {100 * d:.3f}%")
    print("same within", rtol, ":", ok)
    return ok


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=None,
                    help="comma-separated steps (default: every step but check, search3*, final*)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="windows per compiled scan")
    ap.add_argument("--gsm8k-n", type=int, default=200)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--passkey-trials", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    help="holds wikitext-2-raw/wiki.test.raw and gsm8k/{train,test}.jsonl")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                    help="directory for the results")
    ap.add_argument("--check-tag", default="check_cpu")
    ap.add_argument("--search3-only", default=None,
                    help="comma-separated labels of search3 to run (default: all)")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                    help="compare two check files and exit")
    a = ap.parse_args(argv)
    default_steps = ",".join(s for s in STEPS if s not in ("check", "search3", "search3b", "final",
                                                            "final2", "final3"))
    if a.steps is None:
        a.steps = default_steps
    if a.compare:
        return 0 if compare(*a.compare) else 1
    steps = a.steps.split(",")
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    model = ["--model", a.model] if a.model else []
    model += ["--data-dir", a.data_dir, "--out", a.out]
    ppl = ["--windows", str(a.windows), "--decode", str(a.decode), "--batch", str(a.batch),
           *model]
    gen = ["--gen-batch", str(a.gen_batch), *model]
    only3 = ["--only", a.search3_only] if a.search3_only else []
    plan = {
        "check": ["ppl", "--set", "main", "--windows", "1", "--decode", "64", "--batch", "1",
                  "--tag", a.check_tag, *model],
        "main": ["ppl", "--set", "main", *ppl],
        "main2": ["ppl", "--set", "main", "--text", "gsm8k", *ppl],
        "ablations": ["ppl", "--set", "ablations", *ppl],
        "ablations2": ["ppl", "--set", "ablations", "--text", "gsm8k", *ppl],
        "search": ["ppl", "--set", "search", *ppl],
        "search3": ["ppl", "--set", "search3", *only3, *ppl],
        "search3b": ["ppl", "--set", "search3", "--text", "gsm8k", *only3, *ppl],
        "final": ["ppl", "--set", "finalists3", *ppl],
        "final2": ["ppl", "--set", "finalists3", "--text", "gsm8k", *ppl],
        "final3": ["ppl", "--set", "finalists3", "--text", THIRD_TEXT, *ppl],
        "gsm8k": ["gsm8k", "--set", "generation", "--n", str(a.gsm8k_n), *gen],
        "passkey": ["passkey", "--set", "generation", "--lengths", "1024,2048,4096",
                    "--trials", str(a.passkey_trials), *gen],
    }
    for step in STEPS:
        if step not in steps:
            continue
        if step == "search2":
            keep = best_search_labels(a.out) + list(SEARCH_BARS)
            argv_step = ["ppl", "--set", "search", "--text", "gsm8k", "--only", ",".join(keep),
                         *ppl]
        else:
            argv_step = plan[step]
        t0 = time.time()
        print(f"[run_fidelity] {step}: innerq eval {' '.join(argv_step)}", flush=True)
        ev.main(argv_step)
        print(f"[run_fidelity] {step} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())

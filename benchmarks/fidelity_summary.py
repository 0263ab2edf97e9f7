"""Summary of the fidelity results: ``results/fidelity_summary.md`` and ``fidelity_pareto.png``.

Reads the JSON files that ``benchmarks/run_fidelity.py`` wrote under
``benchmarks/results/`` and writes, with no new model runs:

* the comparison with the reference measurements of ``docs/innerq.md`` (window 0
  and windows 0-2, re-aggregated from each window's NLL sum);
* perplexity / KL / top-1 agreement of every configuration on both texts;
* each ablation's effect against paper-faithful InnerQ, on both texts;
* the configuration search and the recommended configuration (lowest perplexity
  among the inner-grouped candidates on *both* texts);
* GSM8K, passkey, and the CPU-versus-GPU check;
* one Pareto plot: perplexity against bytes per cached element, both texts.

Usage: .venv/bin/python benchmarks/fidelity_summary.py
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from innerq_jax import CacheConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TEXTS = (("wiki", "WikiText-2 test"), ("gsm8k-train-solutions", "GSM8K train solutions"))
SEARCH_BARS = ("bf16", "innerq2", "outerq2+sinks")

# docs/innerq.md, "Reference measurements" (an independent PyTorch fake-quantization)
SPEC_W0 = {"bf16": 10.04, "outerq2": 16.28, "outerq2+sinks": 13.98, "innerq2": 22.9,
           "innerq-h2 keys": 13.8, "innerq-h2 keys+values": 13.2, "outerq4": 10.30,
           "innerq4": 10.17, "innerq-h4 keys": 10.14}
SPEC_W02 = {"bf16": 18.68, "outerq2": 25.36, "outerq2+sinks": 21.89, "innerq2": 34.64,
            "innerq-h2 keys+values": 22.11}
SPEC_ABL_W0 = {"innerq2 asymmetric only": 28.7, "innerq2 no sinks": 64.4,
               "innerq2 no centre": 35.8}


def load(name):
    path = os.path.join(RESULTS, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ppl_windows(row, windows, decode_len):
    w = row["nll_per_window"]
    return math.exp(sum(w[i] for i in windows) / (len(windows) * decode_len))


def fmt(x, nd=2):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def spec_section(main, abl):
    n = main["decode_len"]
    rows = {r["label"]: r for r in main["rows"]}
    rows.update({r["label"]: r for r in abl["rows"]} if abl else {})
    out = ["## Against the reference measurements (WikiText-2, `docs/innerq.md`)", "",
           "Re-aggregated from each window's NLL sum of the 8-window run "
           "(`fidelity_ppl_main_wiki.json`, `fidelity_ppl_ablations_wiki.json`).", "",
           "| configuration | window 0 | reference | windows 0-2 | reference | diff 0-2 |",
           "| --- | --- | --- | --- | --- | --- |"]
    for label in list(SPEC_W0) + [k for k in SPEC_ABL_W0]:
        r = rows.get(label)
        if r is None:
            continue
        w0, w02 = ppl_windows(r, [0], n), ppl_windows(r, [0, 1, 2], n)
        ref0 = SPEC_W0.get(label, SPEC_ABL_W0.get(label))
        ref02 = SPEC_W02.get(label)
        diff = f"{100 * (w02 / ref02 - 1):+.1f}%" if ref02 else ""
        out.append(f"| {label} | {w0:.2f} | {fmt(ref0)} | {w02:.2f} | {fmt(ref02)} | {diff} |")
    return out


def ppl_section(title, stem_by_text, effect_vs=None):
    out = [f"## {title}", "",
           "| label | config | B/elem (2k) | B/elem (32k) | "
           + " | ".join(f"{t} ppl | vs bf16 | KL | top-1" for _, t in TEXTS) + " |",
           "| --- | --- | --- | --- | " + " | ".join("--- | --- | --- | ---" for _ in TEXTS) + " |"]
    docs = [load(stem_by_text.format(text=t)) for t, _ in TEXTS]
    if docs[0] is None:
        return []
    by = [{r["label"]: r for r in d["rows"]} if d else {} for d in docs]
    refs = [d["rows"][0]["perplexity"] if d else None for d in docs]
    for r in docs[0]["rows"]:
        cells = []
        for b, ref in zip(by, refs):
            x = b.get(r["label"])
            if x is None:
                cells.append(" | | | ")
                continue
            cells.append(f"{x['perplexity']:.3f} | {100 * (x['perplexity'] / ref - 1):+.1f}% | "
                         f"{x['mean_kl']:.3f} | {x['top1_agreement']:.3f}")
        out.append(f"| {r['label']} | {r['short_name']} | {r['bytes_per_element']:.3f} | "
                   f"{r.get('bytes_per_element_32k', float('nan')):.3f} | " + " | ".join(cells) + " |")
    if effect_vs:
        out += ["", f"Effect of each ablation: perplexity relative to `{effect_vs}` on each text.",
                "", "| ablation | " + " | ".join(t for _, t in TEXTS) + " |",
                "| --- |" + " --- |" * len(TEXTS)]
        for r in docs[0]["rows"]:
            if r["label"] in ("bf16", effect_vs):
                continue
            cells = []
            for b in by:
                x, base = b.get(r["label"]), b.get(effect_vs)
                cells.append(f"{100 * (x['perplexity'] / base['perplexity'] - 1):+.1f}%"
                             if x and base else "")
            out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return out + [""]


def recommend():
    a, b = load("fidelity_ppl_search_wiki"), load("fidelity_ppl_search_gsm8k-train-solutions")
    if not a or not b:
        return None, []
    wa = {r["label"]: r for r in a["rows"]}
    wb = {r["label"]: r for r in b["rows"]}
    limit = wa["innerq2"]["bytes_per_element"] + 1e-9
    cands = [lab for lab in wb if lab not in SEARCH_BARS
             and wa[lab]["bytes_per_element"] <= limit
             and wa[lab]["bytes_per_element_32k"] <= 0.40]
    best_a = min(cands, key=lambda lab: wa[lab]["perplexity"])
    best_b = min(cands, key=lambda lab: wb[lab]["perplexity"])
    lines = ["## Recommended configuration", "",
             f"Candidates: every inner-grouped row of `named_set('search')` at no more bytes than "
             f"paper-faithful InnerQ at the evaluation's context ({limit:.4f} B/elem at 2k, bf16 "
             "windows included) and at most 0.40 B/elem at 32k. The three best on WikiText-2 were "
             "re-run on the second text.", "",
             f"Best on WikiText-2: `{best_a}`; best on GSM8K solutions: `{best_b}`."]
    if best_a == best_b:
        r = wa[best_a]
        preset = CacheConfig.recommended().short_name()
        if r["short_name"] != preset:
            raise SystemExit(f"the search's winner {r['short_name']} is not "
                             f"CacheConfig.recommended() ({preset}): update the preset")
        lines += ["", f"**Recommended: `{best_a}` (`{r['short_name']}`, "
                  "`CacheConfig.recommended()`)**, the winner on both texts:", "",
                  "| text | recommended | InnerQ-H 2-bit (S4 R128) | paper-faithful InnerQ 2-bit | "
                  "OuterQ 2-bit + sinks | bf16 |", "| --- | --- | --- | --- | --- | --- |"]
        for w, (_, t) in zip((wa, wb), TEXTS):
            lines.append(f"| {t} | {w[best_a]['perplexity']:.3f} | "
                         f"{w['innerq-h2 keys+values']['perplexity']:.3f} | "
                         f"{w['innerq2']['perplexity']:.3f} | {w['outerq2+sinks']['perplexity']:.3f} | "
                         f"{w['bf16']['perplexity']:.3f} |")
    return (best_a if best_a == best_b else None), lines + [""]


def generation_sections():
    out = []
    g = load("fidelity_gsm8k_generation")
    if g:
        out += [f"## GSM8K, 8-shot chain of thought, first {g['n']} test problems (greedy)", "",
                "| label | config | accuracy | same answer as bf16 |", "| --- | --- | --- | --- |"]
        out += [f"| {r['label']} | {r['short_name']} | {r['accuracy']:.2f} | {r['agreement']:.2f} |"
                for r in g["rows"]]
        out.append("")
    p = load("fidelity_passkey_generation")
    if p:
        keys = [k for k in p["rows"][0] if k.startswith("L")]
        lengths = sorted({int(k[1:].split("_")[0]) for k in keys})
        n = len(p.get("depths", [])) * p.get("trials", 0)
        out += [f"## Passkey retrieval ({n} prompts per length: depths {p.get('depths')}, "
                f"{p.get('trials')} keys each)", "",
                "| label | " + " | ".join(f"{L // 1024}k" for L in lengths) + " | overall |",
                "| --- |" + " --- |" * (len(lengths) + 1)]
        for r in p["rows"]:
            per = [sum(r[k] for k in keys if k.startswith(f"L{L}_")) /
                   sum(1 for k in keys if k.startswith(f"L{L}_")) for L in lengths]
            out.append(f"| {r['label']} | " + " | ".join(f"{x:.2f}" for x in per)
                       + f" | {r['overall']:.2f} |")
        out.append("")
    a, b = load("fidelity_ppl_check_cpu_wiki"), load("fidelity_ppl_check_gpu_wiki")
    if a and b:
        bb = {r["label"]: r["perplexity"] for r in b["rows"]}
        out += ["## Same math on two devices (window 0, 64 decode steps, main set)", "",
                "| label | CPU | GPU (H200) | diff |", "| --- | --- | --- | --- |"]
        out += [f"| {r['label']} | {r['perplexity']:.3f} | {bb[r['label']]:.3f} | "
                f"{100 * (bb[r['label']] / r['perplexity'] - 1):+.1f}% |" for r in a["rows"]]
        out.append("")
    return out


def pareto_plot(path):
    from models.evaluate import require_eval_extra

    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (text, title) in zip(axes, TEXTS):
        pts = {}
        for stem in ("main", "ablations", "search"):
            d = load(f"fidelity_ppl_{stem}_{text}")
            for r in (d or {}).get("rows", []):
                pts[r["label"]] = (r["bytes_per_element"], r["perplexity"])
        xs, ys = zip(*pts.values())
        ax.scatter(xs, ys, s=14)
        for label, (x, y) in pts.items():
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        front, best = [], float("inf")
        for x, y in sorted(pts.values()):
            if y < best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), "--", alpha=0.5, label="Pareto front")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cache bytes per cached element (capacity 2048, windows included)")
        ax.set_ylabel("decode perplexity (8 windows, P 512, Nd 1024)")
        ax.set_title(f"SmolLM2-135M-Instruct, {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TEXTS3 = TEXTS + (("pride_and_prejudice_ch1", "Pride and Prejudice ch. 1-10"),)


def search3_section(title, stem, texts, note):
    """Issue 14: each text's perplexity, its change against bf16 and against OuterQ + sinks,
    with the per-window spread of that ratio (mean [min, max])."""
    from models.evaluate import SPREAD_BAR, spread_text

    runs = [(name, load(stem.format(text=t))) for t, name in texts]
    runs = [(n, r) for n, r in runs if r is not None]
    if not runs:
        return []
    first = runs[0][1]
    head = "| label | config | B/elem (32k) |"
    sep = "| --- | --- | --- |"
    for name, r in runs:
        head += f" {name} ppl | vs bf16 | vs {SPREAD_BAR} [per-window min, max] |"
        sep += " --- | --- | --- |"
    out = [f"## {title}", "", note.format(windows=first["windows"], decode=first["decode_len"]),
           "", head, sep]
    for row in first["rows"]:
        line = f"| {row['label']} | {row['short_name']} | {row['bytes_per_element_32k']:.3f} |"
        for _, r in runs:
            by = {x["label"]: x for x in r["rows"]}
            x, ref, bar = by.get(row["label"]), r["rows"][0], by.get(SPREAD_BAR)
            if x is None or bar is None:
                line += " | | |"
                continue
            line += (f" {x['perplexity']:.3f} | {100 * (x['perplexity'] / ref['perplexity'] - 1):+.1f}%"
                     f" | {spread_text(x, bar, r['decode_len'])} |")
        out.append(line)
    return out + [""]


def main() -> int:
    main_w = load("fidelity_ppl_main_wiki")
    if main_w is None:
        print("no fidelity_ppl_main_wiki.json under benchmarks/results: run run_fidelity.py first")
        return 1
    lines = ["# Fidelity summary (SmolLM2-135M-Instruct)", "",
             "Built by `benchmarks/fidelity_summary.py` from the JSON files beside it. Perplexity "
             "in decode mode: prefill 512 tokens, 1024 teacher-forced decode steps scored, "
             f"{main_w['windows']} windows per text; G 32, R 128, S 4 unless named. KL is "
             "KL(bf16 || cache) per scored token.", ""]
    lines += spec_section(main_w, load("fidelity_ppl_ablations_wiki")) + [""]
    lines += ppl_section("Every configuration, both texts", "fidelity_ppl_main_{text}")
    lines += ppl_section("Ablations of paper-faithful InnerQ 2-bit", "fidelity_ppl_ablations_{text}",
                         effect_vs="innerq2")
    lines += ppl_section("Configuration search (inner-grouped, 2-bit)", "fidelity_ppl_search_{text}")
    _, rec = recommend()
    lines += rec
    lines += search3_section(
        "2-bit search, issue 14 (CPU, small)", "fidelity_ppl_search3_cpu_{text}", TEXTS,
        "`named_set('search3')`, a subset, on this CPU: {windows} windows per text, P 512, "
        "{decode} decode steps scored. Every candidate is at most 0.40 B/elem at 32k and keeps "
        "S + R <= 132 bf16 tokens. Too few tokens to separate configurations closer than the "
        "per-window spread; it only picks the finalists.")
    lines += search3_section(
        "2-bit finalists, issue 14, three texts", "fidelity_ppl_finalists3_{text}", TEXTS3,
        "`named_set('finalists3')`: {windows} windows per text, P 512, {decode} decode steps "
        "scored. The third text (`benchmarks/data/`) was chosen before any result and never "
        "tuned on. A win counts when it holds on every text and beyond the per-window spread.")
    lines += generation_sections()
    lines += ["![Pareto](fidelity_pareto.png)", ""]
    with open(os.path.join(RESULTS, "fidelity_summary.md"), "w") as f:
        f.write("\n".join(lines))
    pareto_plot(os.path.join(RESULTS, "fidelity_pareto.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

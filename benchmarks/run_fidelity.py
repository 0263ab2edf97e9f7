"""Fidelity runs on the real model (CPU): wraps ``python -m models.evaluate``.

Runs, in order, writing each result under benchmarks/results/fidelity_* as it
completes (so a partial run leaves what it finished):

1. the ``main`` set on WikiText-2 (``--windows`` windows, P=512, Nd=1024);
2. the ``core`` set (bf16, innerq2, innerq-h2 keys+values, outerq2+sinks) on
   GSM8K train solutions joined into one document;
3. the ``ablations`` set on WikiText-2;
4. GSM8K 8-shot (``--gsm8k-n`` problems) and passkey at 1k/2k for the core set.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/run_fidelity.py [--windows 1] [--decode 1024]
"""

from __future__ import annotations

import argparse
import sys

from models.evaluate import main as evaluate


def run(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gsm8k-n", type=int, default=20)
    ap.add_argument("--steps", default="main,second,ablations,gsm8k,passkey")
    a = ap.parse_args(argv)
    common = ["--windows", str(a.windows), "--decode", str(a.decode), "--batch", str(a.batch)]
    steps = a.steps.split(",")
    if "main" in steps:
        evaluate(["ppl", "--set", "main", *common])
    if "second" in steps:
        evaluate(["ppl", "--set", "core", "--text", "gsm8k", *common])
    if "ablations" in steps:
        evaluate(["ppl", "--set", "ablations", *common])
    if "gsm8k" in steps:
        evaluate(["gsm8k", "--set", "core", "--n", str(a.gsm8k_n)])
    if "passkey" in steps:
        evaluate(["passkey", "--set", "core", "--lengths", "1024,2048"])
    return 0


if __name__ == "__main__":
    sys.exit(run())

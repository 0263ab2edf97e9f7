"""Sharded decode equals single-device decode (8 forced host devices).

jax fixes its device count when it starts, so the checks run in one
subprocess with ``--xla_force_host_platform_device_count=8``
(``tests/sharded_decode_check.py``) and are asserted here, one test per claim.

Tolerances. The model runs in float32, so sharded and single-device runs
differ only in the order of sums (all-reduces, split matmuls): about 1e-6
relative in the logits. The cache then rounds keys and values; a value that
sits on a rounding boundary can land on the other side: one bf16 ulp (2^-8
relative) for the bf16 cache, one code step of a group (a third of its range
at 2 bits) for the quantized ones. Measured worst cases over 33 steps: 3e-4
(bf16) and 1.5e-2 (2-bit) of the largest logit, hence the bounds 2e-3 and 5e-2.
Greedy tokens must be identical except where the single-device run's top two
logits are within 1e-3 of the logit scale (a tie either way is correct).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASES = [f"{kind}:{m}" for kind in ("bf16", "innerq", "outerq") for m in ("1x8", "2x4", "8x1")]
CASES += ["signs:1x8"]  # randomized Hadamard signs (a [B, Hkv, D] leaf), fp8 K16 keys
CASES += ["folded:2x4"]  # the recommended cache through DecodeStep: the value rotation folded
# the default suite: every cache kind and every mesh shape once; the rest with -m slow
DEFAULT = ("bf16:8x1", "innerq:2x4", "outerq:1x8", "signs:1x8", "folded:2x4")
PARAMS = [c if c in DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
NUM_LAYERS = 2
_RUNS: dict = {}


def _sharded(case: str) -> dict:
    """The check's output for the group of ``case`` (one subprocess per group, run once)."""
    group = DEFAULT if case in DEFAULT else tuple(c for c in CASES if c not in DEFAULT)
    if group not in _RUNS:
        flags = os.environ.get("XLA_FLAGS", "")  # conftest.py's, kept
        env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, str(HERE / "sharded_decode_check.py"), "--cases", ",".join(group)],
            env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _RUNS[group] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RUNS[group]


@pytest.mark.parametrize("case", PARAMS)
def test_sharded_logits_and_greedy_tokens(case):
    r = _sharded(case)["results"][case]
    bound = 2e-3 if case.startswith("bf16") else 5e-2
    assert r["max_logit_diff"] <= bound * r["logit_scale"], r
    assert r["tokens_equal"], r


@pytest.mark.parametrize("case", PARAMS)
def test_cache_bytes_split_over_the_mesh(case):
    r = _sharded(case)["results"][case]
    assert r["cache_leaves_sharded"], "a cache leaf is not split over (data, model)"
    assert r["devices"] == 8
    # every device holds the same share: each leaf's bytes over the devices splitting it
    assert r["bytes_per_device"] == [r["expected_bytes"]]
    assert r["expected_bytes"] < r["total_bytes"] / 8 + 64  # only [B] lengths/flags repeat


@pytest.mark.parametrize("case", PARAMS)
def test_collectives_in_the_compiled_step(case):
    ops = _sharded(case)["results"][case]["collectives"]
    model_axis = int(case.split(":")[1].split("x")[1])
    # Megatron: one all-reduce after attention and one after the MLP, per layer;
    # attention itself is local, and nothing gathers the cache
    assert ops["all-reduce"] == (2 * NUM_LAYERS if model_axis > 1 else 0), ops
    assert ops["all-gather"] == 0 and ops["all-to-all"] == 0, ops
    assert ops["collective-permute"] == 0 and ops["reduce-scatter"] == 0, ops


def test_mesh_errors_say_what_divides():
    err = _sharded(DEFAULT[0])["errors"]
    assert "batch 12" in err["batch"] and "[1, 2, 3, 4, 6, 12]" in err["batch"]
    assert "12 kv heads" in err["heads"] and "model must divide" in err["heads"]

"""Tests for models/evaluate.py on a tiny random Llama (fast, CPU).

The perplexity check is independent of the decode path: it recomputes the
scored tokens' NLL from one full-sequence prefill (all_logits=True), which
attends over exact float32 keys and values, and compares with the scan of
teacher-forced decode steps through a bf16 cache. The only difference between
the two is the bf16 rounding of cached keys and values, so the perplexities
must agree to 0.5% (relative) on this model.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_weights import _random_hf_tensors, write_tiny_hf_directory

from innerq_jax import CacheConfig
from models import cli, evaluate
from models.evaluate import (
    bytes_per_element,
    decode_perplexity,
    divergence,
    evaluate_configs,
    extract_answer,
    named_set,
)
from models.llama import Llama, ModelConfig, prefill

P, ND, N = 64, 96, 3


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32, max_positions=1024)
    model = Llama(cfg, nnx.Rngs(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    # a token stream with some structure (repeats) so predictions are not uniform
    base = rng.integers(0, 128, size=40)
    stream = np.concatenate([base, rng.integers(0, 128, size=(P + ND) * N)])
    windows = np.stack([np.roll(stream, -7 * i)[: P + ND] for i in range(N)]).astype(np.int32)
    return model, windows


def test_perplexity_matches_full_prefill(tiny):
    model, windows = tiny
    r = decode_perplexity(model, windows, CacheConfig.bf16(), prefill_len=P, decode_len=ND,
                          batch=2)
    assert r["count"] == N * ND
    # independent: one causal forward over the whole window, exact k/v
    cfg = CacheConfig.bf16(capacity=P + ND)
    logits, _ = prefill(model, jnp.asarray(windows), jnp.full((N,), P + ND, jnp.int32), cfg,
                        all_logits=True)
    lp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    # logits at position t predict token t + 1; scored tokens are P .. P + ND - 1
    pred = np.asarray(lp)[:, P - 1:P + ND - 1]
    tgt = windows[:, P:P + ND]
    nll = -np.take_along_axis(pred, tgt[..., None], axis=-1)[..., 0]
    ppl_ref = math.exp(nll.mean())
    assert r["perplexity"] == pytest.approx(math.exp(r["nll_sum"] / r["count"]))
    assert r["perplexity"] == pytest.approx(ppl_ref, rel=5e-3)
    # the first scored token comes from the prefill itself: exact
    assert np.mean(r["nll_per_step"][0]) == pytest.approx(nll[:, 0].mean(), rel=1e-4)


def test_self_divergence_is_zero(tiny):
    model, windows = tiny
    q = CacheConfig.innerq()
    res = evaluate_configs(model, windows[:2], [q, q], prefill_len=P, decode_len=ND, batch=2)
    assert res[1]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert res[1]["top1_agreement"] == 1.0
    assert res[1]["perplexity"] == pytest.approx(res[0]["perplexity"], rel=1e-6)
    d = divergence(model, windows[:2], CacheConfig.bf16(), reference=CacheConfig.bf16(),
                   prefill_len=P, decode_len=ND)
    assert d["mean_kl"] == pytest.approx(0.0, abs=1e-6) and d["top1_agreement"] == 1.0


def test_quantized_divergence_positive(tiny):
    model, windows = tiny
    d = divergence(model, windows[:2], CacheConfig.innerq(recent=0, sink=0), prefill_len=P,
                   decode_len=ND)
    assert d["mean_kl"] > 0 and 0 < d["top1_agreement"] <= 1


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the total is 1,234 apples.\n#### 1,234", "1234"),
    ("The answer is $1,234.50.", "1234.5"),
    ("He pays $18 a day. The answer is $18.", "18"),
    ("The temperature drops to -5 degrees. The answer is -5.", "-5"),
    ("#### -3", "-3"),
    ("She has 3 apples, then 5, so 8 in all", "8"),
    ("The answer is 7.00", "7"),
    ("no number here at all", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_named_sets_and_bytes(tiny):
    model, _ = tiny
    main = named_set("main")
    assert len(main) == 10 and main[0][1].kind == "bf16"
    assert len(named_set("ablations")) == 11
    bf = bytes_per_element(model.cfg, CacheConfig.bf16())
    q2 = bytes_per_element(model.cfg, CacheConfig.innerq())
    assert bf == pytest.approx(2.0, rel=1e-3)  # plus the lengths / flags
    assert 0.3 < q2 < 0.7


# ------------------------------------------------------------------ the eval CLI
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "_load_model", never)


@pytest.mark.parametrize("argv", [["ppl"], ["ppl", "--text", "missing.txt"],
                                  ["ppl", "--text", "gsm8k"], ["gsm8k"]])
def test_eval_without_data_says_where_to_get_it(tmp_path, monkeypatch, capsys, no_model, argv):
    """No text given and none found (nothing is read from outside the flags and the
    working directory): a clear error before the model loads."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "innerq: error: no " in err
    assert "huggingface.co/datasets/Salesforce/wikitext" in err
    assert "github.com/openai/grade-school-math" in err and "--data-dir" in err


def test_eval_without_the_extra_names_it(monkeypatch, capsys, no_model):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(["eval", "passkey"]) == 2
    assert "pip install 'innerq-jax[eval]'" in capsys.readouterr().err


def _tree_state(path: pathlib.Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in path.rglob("*") if p.is_file()}


def test_eval_reads_and_writes_only_where_told(tmp_path, monkeypatch, capsys):
    """Perplexity of a tiny checkpoint on a given text: results land in --out (or the
    working directory), never in the source tree."""
    model = tmp_path / "tiny"
    write_tiny_hf_directory(model, _random_hf_tensors(np.random.default_rng(3), tied=True))
    rng = np.random.default_rng(4)
    words = ["the", "hello", "tell", "he", "lo", "ll", "ot", "et"]
    text = tmp_path / "story.txt"
    text.write_text(" ".join(rng.choice(words, size=400)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    source = _tree_state(ROOT / "benchmarks") | _tree_state(ROOT / "models")
    argv = ["eval", "ppl", "--set", "main", "--only", "bf16", "--text", str(text), "--model",
            str(model), "--prefill", "16", "--decode", "16", "--windows", "2", "--batch", "2",
            "--dtype", "float32"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    stems = {p.name for p in (tmp_path / "out").iterdir()}
    assert stems == {f"fidelity_ppl_main_story.{ext}" for ext in ("json", "md", "png")}
    assert list(cwd.iterdir()) == []
    assert cli.main(argv) == 0
    assert {p.name for p in cwd.iterdir()} == stems
    assert _tree_state(ROOT / "benchmarks") | _tree_state(ROOT / "models") == source
    rows = json.loads((cwd / "fidelity_ppl_main_story.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["bf16"] and rows[0]["count"] == 2 * 16
    assert math.isfinite(rows[0]["perplexity"]) and rows[0]["perplexity"] > 1
    capsys.readouterr()

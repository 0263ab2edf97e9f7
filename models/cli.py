"""``innerq``: generate text on an InnerQ cache, or evaluate cache fidelity.

    innerq generate "The capital of France is"
    innerq generate --cache bf16 --max-new-tokens 64 "Tell me a joke"
    innerq eval ppl --set main --text wiki.test.raw     (see models/evaluate.py)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
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


def render_chat(template: str, prompt: str) -> str:
    """The model's chat template applied to one user message.

    The template comes with the model (tokenizer_config.json, GGUF metadata), so it is
    untrusted code: it renders in jinja2's immutable sandbox, with the options and
    helpers transformers gives chat templates.
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                              indent=indent)
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    except TemplateError as err:  # SecurityError included
        raise ValueError(f"the model's chat template failed ({type(err).__name__}: {err}); "
                         "--raw skips it") from err


class TextStream:
    """Writes generated text as the tokenizer finishes decoding it.

    A character split over several tokens (emoji, CJK: several UTF-8 bytes) is written
    once complete, never as U+FFFD halves (tokenizers' DecodeStream holds it back).
    """

    def __init__(self, tokenizer, out):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.out = tokenizer, out
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.written = ""
        self.first_token_at = None  # perf_counter() when the first token reached the host

    def __call__(self, step, tokens, done):
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if bool(done[0]):
            return
        self.ids.append(int(tokens[0]))
        self._write(self.decoder.step(self.tokenizer, self.ids[-1]))

    def finish(self):
        """Whatever is still held back once generation has ended (a byte sequence the
        model never completed is then shown as it decodes)."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.startswith(self.written):
            self._write(full[len(self.written):])

    def _write(self, text):
        if text:
            self.out.write(text)
            self.out.flush()
            self.written += text


def _gpu_visible() -> bool:
    """Whether nvidia-smi lists a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def device_line() -> str:
    """What jax runs on, e.g. "gpu (NVIDIA H200), 1 device, jax 0.11.2"."""
    import jax

    dev, n = jax.devices()[0], jax.device_count()
    kind = "" if dev.device_kind.lower() == dev.platform else f" ({dev.device_kind})"
    return f"{dev.platform}{kind}, {n} device{'s' if n > 1 else ''}, jax {jax.__version__}"


def check_device() -> None:
    """Warns on stderr when a GPU is visible but jax runs on the CPU (a CPU-only jaxlib)."""
    import jax

    if jax.default_backend() == "cpu" and _gpu_visible():
        print("[innerq] warning: nvidia-smi sees a GPU, but jax has only the CPU (a CPU-only "
              "jax is installed). Install the GPU build: bash setup.sh --gpu "
              "(or pip install 'innerq-jax[gpu]')", file=sys.stderr)


def mesh_for(spec: str | None, num_kv_heads: int):
    """``--mesh data=D,model=M``; by default every local device the work splits over
    (model | kv heads, data | the batch of 1), or None on a single device."""
    from innerq_jax.sharding import check_divisible, default_mesh, parse_mesh

    mesh = parse_mesh(spec) if spec else default_mesh(num_kv_heads, batch=1)
    check_divisible(mesh, 1, num_kv_heads)
    return None if mesh.size == 1 else mesh


def _mesh_text(mesh) -> str:
    if mesh is None:
        return "one device"
    return f"data={mesh.shape['data']}, model={mesh.shape['model']} ({mesh.size} devices)"


def cmd_generate(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from models.generate import Sampling, generate
    from models.llama import Llama, shard_model
    from models.weights import load_checkpoint

    # Everything the arguments decide is checked before the model loads (seconds).
    cfg = _cache_config(args)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, repetition_penalty=args.repetition_penalty)
    if args.max_new_tokens > cfg.capacity:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} needs a cache of at least "
                         f"{args.max_new_tokens} tokens; --capacity is {cfg.capacity}")
    if args.mesh:
        from innerq_jax.sharding import parse_mesh

        parse_mesh(args.mesh)  # the spec and the device count, before the model loads
    check_device()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    tok = ckpt.tokenizer
    text = args.prompt
    if ckpt.chat_template and not args.raw:
        text = render_chat(ckpt.chat_template, args.prompt)
    ids = tok.encode(text, add_special_tokens=False).ids
    model = Llama.from_checkpoint(ckpt, dtype=jnp.bfloat16)
    mesh = mesh_for(args.mesh, model.cfg.num_kv_heads)
    if mesh is not None:
        shard_model(model, mesh)
    print(f"[innerq] model {ckpt.source} loaded in {time.perf_counter() - t0:.1f}s; "
          f"prompt {len(ids)} tokens; cache {cfg.short_name()}", file=sys.stderr)

    stream = None if args.no_stream else TextStream(tok, sys.stdout)
    gen = generate(model, [ids], cfg, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   eos_ids=ckpt.eos_token_ids, backend=args.backend, stream=stream, mesh=mesh)
    n = int(gen.lengths[0])
    run_start = time.perf_counter() - gen.run_s
    ttft = None if stream is None or stream.first_token_at is None else \
        stream.first_token_at - run_start
    rest = gen.run_s - (ttft or 0.0)
    if stream is None:
        sys.stdout.write(tok.decode(gen.tokens[0, :n].tolist(), skip_special_tokens=True))
    else:
        stream.finish()
    print()
    sys.stdout.flush()
    cache = gen.cache
    sizes = cache.region_sizes()
    total, dense = cache.total_nbytes(), cache.bf16_nbytes()
    report = [
        "--- report ---",
        f"device             {device_line()}",
        f"mesh               {_mesh_text(mesh)}",
        f"compile            {gen.compile_s:.1f}s (prefill + decode loop, once per run)",
        f"tokens generated   {n} in {gen.run_s:.2f}s after compile "
        f"({n / max(gen.run_s, 1e-9):.1f} tokens/s)"
        + ("" if ttft is None else
           f"; first token {ttft * 1e3:.0f} ms, then {(n - 1) / max(rest, 1e-9):.1f} tokens/s"),
        f"cache              {cfg.short_name()}  capacity {cfg.capacity} tokens/sequence",
        f"cache bytes        {_fmt_bytes(total)} vs bf16 {_fmt_bytes(dense)} "
        f"({total / dense:.3f}x, {dense / total:.1f}x smaller)",
        f"tokens in regions  sink {int(sizes.sink[0])} / quantized {int(sizes.quantized[0])} "
        f"/ recent {int(sizes.recent[0])}  (total {int(np.asarray(cache.lengths)[0])})",
        f"config             {cfg}",
    ] + (["weights            the value rotation folded into W_v and W_o for the run "
          "(models.llama.fold_value_rotation)"] if cfg.rotate_values else []) + [
        f"sampling           temperature {sampling.temperature}, top-k {sampling.top_k}, "
        f"top-p {sampling.top_p}, repetition penalty {sampling.repetition_penalty}",
    ]
    print("\n".join(report), file=sys.stderr)
    return 0


def _int_at_least(low: int):
    """An argparse type: an int >= low, the error naming the value and the bound."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} must be an int >= {low}")
        return n
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _temperature(text: str) -> float:
    x = _float(text)
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 is greedy)")
    return x


def _top_p(text: str) -> float:
    x = _float(text)
    if not 0 < x <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} must lie in (0, 1] (1 disables it)")
    return x


def _penalty(text: str) -> float:
    x = _float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0 (1 disables it)")
    return x


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
    g.add_argument("--group-size", type=int, default=32, choices=[16, 32, 64, 128])
    g.add_argument("--sink", type=_int_at_least(0), default=None,
                   help="sink tokens (default: the preset's: recommended 36, innerq 4, outerq 0)")
    g.add_argument("--recent", type=_int_at_least(0), default=None,
                   help="recent tokens (default: the preset's: recommended 96, else 128)")
    g.add_argument("--rotation", choices=["none", "keys", "keys_values"], default=None,
                   help="Hadamard rotation (default: the preset's: recommended keys_values, "
                        "innerq none)")
    g.add_argument("--capacity", type=_int_at_least(1), default=1024)
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=256)
    g.add_argument("--temperature", type=_temperature, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=_int_at_least(0), default=0, help="0 disables it")
    g.add_argument("--top-p", type=_top_p, default=1.0, help="in (0, 1]; 1 disables it")
    g.add_argument("--repetition-penalty", type=_penalty, default=1.1,
                   help="> 0: the logits of tokens already in the sequence divided by it "
                        "(multiplied where negative); the default 1.1 keeps a small model's "
                        "greedy text out of loops; 1 disables it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh (default: every local device the work splits over: "
                        "model divides the kv heads, data the batch of 1)")
    g.add_argument("--backend", choices=["auto", "reference", "pallas", "interpret", "tpu",
                                         "tpu-interpret"],
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
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"innerq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

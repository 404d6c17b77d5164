# The two commands of README.md: `make demo` runs the main job, `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_TMPDIR ?= $(CURDIR)/.tmp/ray
export SPIN_RAY_CACHE ?= $(CURDIR)/.cache/spin_ray
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export MALLOC_ARENA_MAX ?= 2

.PHONY: setup lint demo test test-unit test-integration test-e2e bench bench-training image lock-gpu gpu-check gpu-check-wheels clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check spin_ray tests bench scripts

demo: setup
	@mkdir -p $(RAY_TMPDIR)
	$(VENV)/bin/spin-ray run jobs/gsm8k_smollm2_cpu.yaml

test: setup
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m pytest tests -q

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-integration: setup
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m pytest tests/integration -q

test-e2e: setup
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m pytest tests/e2e -q

bench: setup
	@mkdir -p $(RAY_TMPDIR)
	$(PY) bench/generation.py

bench-training: setup
	@mkdir -p $(RAY_TMPDIR)
	$(VENV)/bin/pip install -q "trl==1.16.0"  # the `bench` extra: TRL is the baseline, not a dependency
	$(PY) bench/training.py

# The first GPU run's check (bench/gpu_check.py): no Ray, no vLLM, no network. On a bare CUDA machine whose Python
# has torch, transformers and peft but not pydantic, carry the wheels gpu-check-wheels downloads (.whl/, 2 MB) and
# run: pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 bench/gpu_check.py
gpu-check: setup
	$(PY) bench/gpu_check.py --out gpu-check.json

GPU_CHECK_PYTHON ?= 3.12
gpu-check-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_CHECK_PYTHON) --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

# The GPU image (Dockerfile): Ray 2.60 with cluster/requirements-gpu.txt and this checkout. Needs a Docker engine.
IMAGE ?= spin-ray:0.1.0
image:
	docker build -t $(IMAGE) .

# Re-resolve cluster/requirements-gpu.txt after a dependency changes in pyproject.toml (needs PyPI, no GPU).
lock-gpu:
	bash scripts/lock_gpu.sh

clean:
	rm -rf .tmp .pytest_cache

# The two commands of README.md: `make demo` runs the main job, `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_TMPDIR ?= $(CURDIR)/.tmp/ray
export SPIN_RAY_CACHE ?= $(CURDIR)/.cache/spin_ray
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export MALLOC_ARENA_MAX ?= 2

.PHONY: setup demo test test-unit test-integration test-e2e bench bench-training image lock-gpu clean

setup:
	@bash scripts/setup.sh

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

# The GPU image (Dockerfile): Ray 2.60 with cluster/requirements-gpu.txt and this checkout. Needs a Docker engine.
IMAGE ?= spin-ray:0.1.0
image:
	docker build -t $(IMAGE) .

# Re-resolve cluster/requirements-gpu.txt after a dependency changes in pyproject.toml (needs PyPI, no GPU).
lock-gpu:
	bash scripts/lock_gpu.sh

clean:
	rm -rf .tmp .pytest_cache

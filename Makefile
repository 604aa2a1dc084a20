# The commands of README.md and docs/development.md. Targets that need .venv create it when
# it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The GPU machine's stack (constraints-gpu.txt) in a second venv, with the wheels it lacks
# (bench/gpu_wheels.txt) installed as bench/gpu_check.sh installs them there.
GPU_STACK_PYTHON ?= /root/.pyenv/versions/3.12.1/bin/python
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
# What test-gpu-stack runs: the whole suite; narrow it here (e.g. tests/kernels tests/ops
# tests/test_losses.py) if CI's time demands.
GPU_STACK_TESTS ?= tests

.PHONY: install test test-fast demo lint format bench clean \
	install-gpu-stack test-gpu-stack gpu-check-dry-run

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit-test loop: everything but the tests marked slow (subprocesses, torch.compile,
# several processes, the demo end to end).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

$(GPU_STAMP): pyproject.toml constraints-gpu.txt bench/gpu_wheels.txt
	test -x $(GPU_PY) || $(GPU_STACK_PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q -r constraints-gpu.txt
	bash bench/gpu_check.sh --download
	PYTHON=$(GPU_PY) bash bench/gpu_check.sh --install
	$(GPU_PY) -m pip check
	touch $(GPU_STAMP)

install-gpu-stack: $(GPU_STAMP)

test-gpu-stack: $(GPU_STAMP)
	$(GPU_PY) -m pytest -q $(GPU_STACK_TESTS)

gpu-check-dry-run: $(GPU_STAMP)
	PYTHON=$(GPU_PY) bash bench/gpu_check.sh --dry-run

demo: $(STAMP)
	$(PY) -m tinyclip_fast demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/bench_affinity_loss.py
	$(PY) bench/bench_masked_matmul.py
	$(PY) bench/bench_distill_step.py

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info .pytest_cache

# The README's two commands: `make run` (the whole pipeline on Fashion-MNIST, CPU) and `make test`.
# Both create .venv, install the project and the Debian packages they need, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXPERIMENT ?= fashion_mnist_quick
ARGS ?=
# pytest-xdist workers for `make test`: one per core of the 2-core machines (each test process uses one
# torch thread, tests/conftest.py). --dist loadfile: a file's tests run on one worker, so a module fixture
# (often a training run through the CLI) is built once, and the local-cluster tests stay together.
# (loadgroup would be finer, but xdist 3.8 cannot group under pytest 9.) TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: run test test-all setup system-deps lint bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

system-deps:
	@bash scripts/system_deps.sh

run: setup system-deps
	$(PY) -m pipeline.run experiment=$(EXPERIMENT) $(ARGS)

# Without root (or without the Debian packages) the tests still run: the data and Slurm tests that
# cannot run skip and say why (pytest -ra). The cluster lives in a private mktemp directory; stop removes it.
SLURM_UNAVAILABLE := echo "make: no local Slurm cluster (reason above): the tests marked slurm will be skipped"

test: setup
	$(VENV)/bin/lint-imports
	bash scripts/system_deps.sh test
	bash slurm/local_cluster.sh start || $(SLURM_UNAVAILABLE)
	$(PYTEST) $(ARGS); rc=$$?; bash slurm/local_cluster.sh stop; exit $$rc

test-all: setup
	$(VENV)/bin/lint-imports
	bash scripts/system_deps.sh test
	bash slurm/local_cluster.sh start || $(SLURM_UNAVAILABLE)
	$(PYTEST) -m "" $(ARGS); rc=$$?; bash slurm/local_cluster.sh stop; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup system-deps
	$(PY) bench/dataloader.py

# The GPU path in one call: every stage's training step (bf16-mixed, torch.compile) at the LDM-4 and demo
# sizes, the U-Net's MFU, SDPA backends and debug=fdr of each stage on CUDA (~5 min on one GPU); not in
# `make test` (tests/unit/test_gpu_check.py runs its CPU form). A machine without our dependencies: see
# bench/gpu_wheels.sh.
gpu-check: setup
	$(PY) bench/gpu_check.py --device cuda $(ARGS)

clean:
	rm -rf runs outputs multirun .pytest_cache

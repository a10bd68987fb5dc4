# The README's two commands: `make run` (the whole pipeline on Fashion-MNIST, CPU) and `make test`.
# Both create .venv, install the project and the Debian packages they need, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXPERIMENT ?= fashion_mnist_quick
ARGS ?=

.PHONY: run test test-all setup system-deps lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

system-deps:
	@bash scripts/system_deps.sh

run: setup system-deps
	$(PY) -m pipeline.run experiment=$(EXPERIMENT) $(ARGS)

test: setup system-deps
	$(VENV)/bin/lint-imports
	bash scripts/system_deps.sh slurm
	bash slurm/local_cluster.sh start
	$(PY) -m pytest $(ARGS); rc=$$?; bash slurm/local_cluster.sh stop; exit $$rc

test-all: setup system-deps
	$(VENV)/bin/lint-imports
	bash scripts/system_deps.sh slurm
	bash slurm/local_cluster.sh start
	$(PY) -m pytest -m "" $(ARGS); rc=$$?; bash slurm/local_cluster.sh stop; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup system-deps
	$(PY) bench/dataloader.py

clean:
	rm -rf runs outputs multirun .pytest_cache

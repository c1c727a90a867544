# Three commands: `make demo`, `make paper` and `make test`. All create the virtual environment on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test test-fast demo paper lint bench clean

venv: $(VENV)/.installed

# Re-install when setup.py changes. torch goes first, pinned, so nothing pulls a CUDA build.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	bash scripts/demo.sh

# each model of the cascade measured against ground truth (issue 13); PAPER_FAST=1 for the smoke test.
# One thread per process, as in scripts/demo.sh (several processes share 2 cores).
paper: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m vldm.paper

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: venv
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs *.egg-info

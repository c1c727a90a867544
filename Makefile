# Two commands: `make demo` and `make test`. Both create the virtual environment on first use.
# `make paper`: every model of the cascade measured against ground truth (docs/paper.md).
# `make gpu-check`: the GPU bring-up on a lent GPU machine, with its own Python (docs/gpu.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test test-fast demo paper lint bench clean gpu-check gpu-wheels

venv: $(VENV)/.installed

# Re-install when setup.py changes. torch goes first, pinned, so nothing pulls a CUDA build.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

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

# The GPU bring-up (docs/gpu.md): no virtual environment and no registry there. The wheels of .gpu_wheels/
# (made here by `make gpu-wheels`, carried with the tree) go into .gpu_site/ next to the machine's own torch.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-wheels:
	bash scripts/gpu_wheels.sh

gpu-check:
	@test -d .gpu_wheels || { echo "gpu-check: no .gpu_wheels/ (run 'make gpu-wheels' where PyPI is reachable and carry it)"; exit 2; }
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --upgrade --target .gpu_site .gpu_wheels/*.whl
	PYTHONPATH=$(abspath .gpu_site) $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

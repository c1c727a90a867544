#!/usr/bin/env bash
# Wheels for `make gpu-check` on the lent GPU machine, downloaded HERE (where PyPI is reachable) into
# .gpu_wheels/ (git-ignored; carried with the working tree, < 60 MiB). That machine has Python 3.12, torch
# (CUDA), transformers, einops, safetensors and triton, and reaches no registry: `make gpu-check` installs
# from this folder offline (pip install --no-index --find-links .gpu_wheels). Only what it lacks is here:
# diffusers and its few dependencies transformers may not bring (requests is no longer one of
# huggingface-hub 1.x), and pytest for the `gpu` tests. Each is a
# pure-Python wheel or a cp312 manylinux one; --no-deps keeps torch and CUDA packages out (they are there).
#   bash scripts/gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
# versions: the ones this repository is tested with (setup.py pins diffusers); the others, current releases
# that support Python 3.12
PKGS=(
  diffusers==0.42.1 importlib_metadata zipp pillow requests charset_normalizer idna urllib3 certifi
  pytest pluggy iniconfig pygments pytest-timeout
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" "${PKGS[@]}"
du -sh "$DEST"
ls "$DEST"

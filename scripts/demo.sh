#!/usr/bin/env bash
# `make demo`: the whole Video LDM pipeline on one CPU machine, and the proof that the method learns
# (issue 7). Stages, outputs and knobs: vldm/demo/run.py. Everything lands in outputs/demo/.
#
#   bash scripts/demo.sh              # full variant: < 15 min, < 8 GB on 2 cores
#   DEMO_FAST=1 bash scripts/demo.sh  # the < 3 min smoke test run by tests/test_demo.py
#
# Env: DEMO_OUT (output dir), DEMO_SLURM=auto|0|1 (temporal stage through sbatch when a SLURM cluster
# with 2 idle nodes answers), VLDM_KEEP_CLUSTERS=1 (leave the Ray cluster the demo started running),
# WANDB_MODE (default offline; W&B files go to $DEMO_OUT/wandb).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ]; then
  echo "[demo] setting up the environment ($VENV): make venv"
  make -s venv VENV="$VENV"
fi
export PATH="$PWD/$VENV/bin:$PATH"   # ray, the venv's ninja (one binary: DeepSpeed's JIT ops build once)
# One thread per process. Several processes run at once (2 trainer ranks, Ray workers), and on a shared
# 2-core machine a 2-thread torch process spins in OpenMP barriers: an autoencoder step took 9.0 s with
# 2 threads against 0.43 s with 1 under load (measured). The sbatch script also gives each rank 1.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
exec "$VENV/bin/python" -m vldm.demo "$@"

"""Launching real training runs from tests: the sbatch script with bash (local ranks) or sbatch, or
ranks started by hand, and reading what they wrote (metrics.jsonl, checkpoints, W&B offline files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train_temporal.sbatch"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
# the tiny config at 2 ranks x 1 clip (global batch 2); 1 rank x 2 clips is the same global batch
STEPS = 16
TINY_RUN = [f"train.max_steps={STEPS}", "checkpoint.every=4", "checkpoint.keep_last=5", "deepspeed.timeout_s=90"]


def train_env(tmp: Path, wandb: bool = False) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every run: bit-identical float sums
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if wandb:
        d = tmp / "wandb_home"
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(d / sub)
        env["WANDB_MODE"] = "offline"
        env["WANDB_SILENT"] = "true"
    return env


def run_local(
    run_dir: Path, *overrides: str, nproc: int = 2, env: dict | None = None, timeout: float = 240, config: Path = TINY
) -> subprocess.CompletedProcess:
    """`bash slurm/train_temporal.sbatch CONFIG run_dir=... overrides` with NPROC local ranks."""
    env = dict(env or train_env(run_dir.parent))
    env["NPROC"] = str(nproc)
    cmd = ["bash", str(SBATCH), str(config), f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss of the metric lines that have one."""
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(argv: list[str], nproc: int, env: dict, log_dir: Path) -> list[subprocess.Popen]:
    """Start `nproc` processes of `python argv...` as ranks 0..n-1 by hand (no launcher)."""
    port = free_port()
    procs = []
    for r in range(nproc):
        e = {
            **env,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
        }
        out = open(log_dir / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT))
    return procs


SBATCH_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]  # the EDIT lines, for CPU nodes


def submit(config: Path, tmp: Path, env: dict, *overrides: str) -> str:
    """`sbatch slurm/train_temporal.sbatch CONFIG overrides...` on 2 CPU nodes of the local cluster: the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *SBATCH_OPTS, f"--output={tmp}/slurm-%j.out", str(SBATCH), str(config), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(name + "=")), "")

"""The eval pool on a real local Ray cluster: submitted as a Ray job (the README's command), one result
per checkpoint, a rerun that does nothing, and a worker killed mid-job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RAY_GCS
from eval_helpers import make_tiny_run

from vldm.eval.wandb_reader import history

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "sampling.num_samples=4",
    "sampling.steps=2",
    "val_loss.num_clips=2",
    "val_loss.timesteps=[300,700]",
    "pool.shard_size=2",
    "pool.poll_interval_s=0.2",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("ray_tiny"))


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the test cluster lives on loopback: without this Ray rewrites 127.0.0.1 to the eth0 address
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_ADDRESS=RAY_GCS, **extra)
    return env


def _results(run: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in run.glob("eval/*/step_*/result.json"):
        out.setdefault(p.parent.name, []).append(p)
    return out


def test_job_submit_evaluates_each_checkpoint_once_and_a_rerun_does_nothing(ray_cluster, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    wdir = tmp_path / "wandb"
    wenv = {k: str(wdir) for k in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    wenv.update(WANDB_MODE="offline", WANDB_SILENT="true")
    wdir.mkdir()
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        ray_cluster,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"env_vars": wenv}),
        "--",
        "python",
        "ray_jobs/eval_pool.py",
        "--run-dir",
        str(run),
        "--once",
        "--suite",
        "configs/eval/tiny.yaml",
        *FAST,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "2 checkpoint(s) evaluated, 0 failed" in log
    res = _results(run)
    assert sorted(res) == ["step_00000100", "step_00000200"] and all(len(v) == 1 for v in res.values())
    metrics = json.loads(res["step_00000200"][0].read_text())["metrics"]
    assert {"ema/flicker", "raw/flicker", "ema/val_loss", "raw/consistency"} <= set(metrics)
    (wfile,) = wdir.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(wfile)
    assert sorted(row["trainer/global_step"] for row in rows) == [100, 200]
    assert all("eval/ema/flicker" in row and row["eval/ema/samples/videos"][0]["_type"] == "video-file" for row in rows)

    # rerun (plain driver this time): nothing to do, nothing rewritten, no actor started
    before = {p: p.stat().st_mtime_ns for p in run.joinpath("eval").rglob("*") if p.is_file() and p.name != ".lock"}
    r2 = subprocess.run(
        [
            sys.executable,
            "ray_jobs/eval_pool.py",
            "--run-dir",
            str(run),
            "--once",
            "--suite",
            "configs/eval/tiny.yaml",
            *FAST,
        ],
        cwd=ROOT,
        env=_env(**wenv),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    assert "0 checkpoint(s) evaluated" in r2.stdout and "shards planned" not in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(list(wdir.glob("wandb/offline-run-*"))) == 1  # nothing new logged


@pytest.mark.faults
def test_a_killed_worker_still_gives_exactly_one_result_per_checkpoint(ray_cluster, tiny_run, tmp_path):
    """Workers SIGKILLed at several points of their shards (as soon as one is seen running, and some
    time into one, while sampling, extracting or writing): one result per checkpoint, every shard once,
    and no temp file anywhere under the run directory."""
    from ray.util.state import list_tasks

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # longer shards (more sampler steps) so the kills land while a shard is being computed
    proc = subprocess.Popen(
        [
            sys.executable,
            "ray_jobs/eval_pool.py",
            "--run-dir",
            str(run),
            "--once",
            *FAST,
            "sampling.steps=12",
            "pool.max_attempts=5",  # three kills may hit one shard: it still has a try left
            "wandb.enabled=false",
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    delays = [0.0, 0.7, 1.6]  # seconds after a shard is first seen running
    killed: list[int] = []
    try:
        deadline = time.time() + 180
        seen: dict[int, float] = {}
        while len(killed) < len(delays) and time.time() < deadline and proc.poll() is None:
            running = list_tasks(
                address=ray_cluster,
                filters=[("func_or_class_name", "=", "EvalActor.run"), ("state", "=", "RUNNING")],
                raise_on_missing_output=False,
            )
            now = time.time()
            for pid in (t.worker_pid for t in running if t.worker_pid and t.worker_pid not in killed):
                seen.setdefault(pid, now)
                if now - seen[pid] >= delays[len(killed)]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(killed) >= 2, f"only {len(killed)} running eval task(s) were seen"
    assert proc.returncode == 0, out[-4000:]
    assert "worker lost (attempt 1/5)" in out
    res = _results(run)
    assert sorted(res) == ["step_00000100", "step_00000200"] and all(len(v) == 1 for v in res.values())
    assert out.count("step_00000100: result written") == 1 and out.count("step_00000200: result written") == 1
    for p in (run / "eval").glob("*/step_*"):
        shards = sorted(q.name for q in (p / "shards").iterdir())
        assert len(shards) == 6 and not any(q.startswith(".") for q in shards)  # every shard once
    left = [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name]
    assert left == [], left  # no temp file anywhere under RUN

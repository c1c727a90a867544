"""The trainer side of the fault matrix (issue 11), with configs/rehearsal_cpu.yaml (sd15_t2v's shape at toy
size: 1 clip per rank, 2 loader workers, grad_accum 2, uint8 pixels through a VAE, EMA, W&B "online", shards
through a file:// URL) through the real entry points (`sbatch slurm/train_temporal.sbatch` on the local SLURM
cluster, `bash slurm/train_temporal.sbatch` = `python -m vldm.train` ranks).

One uninterrupted reference run (module fixture) is itself the W&B-unreachable run and carries a rehearsed
non-finite loss (step 3) and gradient spike (step 4) on rank 1; the other tests compare against it. See
docs/failure-behaviour.md for the table these tests back.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_data_loader import shard_corpus
from train_helpers import ROOT, SBATCH, SBATCH_OPTS, describe, job_field, losses, metrics, run_local, submit, train_env

from vldm.checkpoint import COMPLETE, TEMPORAL_EMA_WEIGHTS, TEMPORAL_WEIGHTS, TRAINER_STATE, complete_checkpoints
from vldm.config import Config, build_config
from vldm.config.data import SyntheticConfig
from vldm.train.checkpointing import CORRUPT_PREFIX, plan_resume
from vldm.train.lr import lr_at

pytestmark = pytest.mark.faults
REHEARSAL = ROOT / "configs" / "rehearsal_cpu.yaml"
STEPS = 8  # the config's max_steps; a checkpoint every 2
INJECT = [
    "train.debug_inject_nonfinite_steps=[3]",
    "train.debug_inject_grad_spike_steps=[4]",
    "train.debug_inject_rank=1",
    "checkpoint.keep_last=4",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from vldm.data.synthetic import write_corpus
    from vldm.models.base import build_tiny_base

    root = tmp_path_factory.mktemp("rehearsal")
    base = build_tiny_base(root / "base", vae_channels=(8, 8))
    write_corpus(SyntheticConfig(output=str(root / "videos"), count=16, size="32", frames=16, fps=8, seed=5))
    shard_corpus(root / "videos", root / "shards", videos_per_shard=4, frames=8, fps=8, size="32")
    return {"root": root, "base": base, "url": f"file://{root / 'shards'}"}


def args(data: dict, run: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"model.pretrained={data['base']}", f"data.shards={data['url']}", *extra]


def unreachable_wandb(env: dict) -> dict:
    """W&B "online" at a closed loopback port: the real fault (nothing listens, connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when this block ends: nothing listens there
    env = {**env, "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_API_KEY": "k" * 40}
    env.pop("WANDB_MODE", None)  # the config's mode (online) decides
    return env


@pytest.fixture(scope="module")
def ref(data) -> dict:
    """The uninterrupted run: 2 ranks, W&B online against a closed port, rank 1's loss NaN at step 3 and its
    gradient inf at step 4 (train.debug_inject_*)."""
    tmp = data["root"] / "ref"
    tmp.mkdir()
    run = tmp / "run"
    env = unreachable_wandb(train_env(tmp, wandb=True))
    t0 = time.time()
    proc = run_local(run, *args(data, run, *INJECT)[1:], nproc=2, env=env, timeout=1500, config=REHEARSAL)
    assert proc.returncode == 0, describe(proc)
    return {"run": run, "proc": proc, "tmp": tmp, "wall_s": time.time() - t0}


def same_losses(a: dict[int, float], b: dict[int, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / TEMPORAL_WEIGHTS))


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ W&B unreachable, non-finite burst skipped
def test_wandb_unreachable_at_start_warns_falls_back_to_offline_files_and_training_goes_on(ref):
    from vldm.eval.wandb_reader import history

    out = ref["proc"].stdout + ref["proc"].stderr
    assert "could not reach the server within wandb.init_timeout_s=10 s" in out and "OFFLINE files" in out
    assert sorted(losses(ref["run"])) == list(range(1, STEPS + 1))
    files = sorted((ref["tmp"] / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows = [r for r in history(files[0]) if "train/loss" in r]
    assert [r["trainer/global_step"] for r in rows] == list(range(1, STEPS + 1))  # every step, once


def test_rehearsed_nonfinite_loss_and_grad_spike_are_skipped_on_every_rank_at_the_same_step(ref):
    out = ref["proc"].stdout
    by_step = {m["step"]: m for m in metrics(ref["run"]) if "train/loss" in m}
    assert math.isnan(by_step[3]["train/loss"]) and math.isfinite(by_step[4]["train/loss"])  # NaN logged as NaN
    assert [by_step[s]["train/skipped_steps"] for s in range(1, STEPS + 1)] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert "step 3/8 loss nan" in out and "SKIPPED" in out
    ck = {int(c.name[5:]): c for c in complete_checkpoints(ref["run"])}
    # ZeRO-2: each rank updates its own partition, so "skipped on every rank" = no weight changed anywhere
    assert sorted(ck) == [2, 4, 6, 8] and equal(weights(ck[2]), weights(ck[4]))
    state4 = json.loads((ck[4] / TRAINER_STATE).read_text())
    assert state4["skipped_steps"] == 2 and state4["bad_streak"] == 2
    assert not equal(weights(ck[4]), weights(ck[6]))  # training goes on after the burst


# ------------------------------------------------------------------------- SIGTERM to every process, requeue


def sbatch(tmp: Path, env: dict, *overrides: str) -> str:
    return submit(REHEARSAL, tmp, env, *overrides)


def wait_until(pred, timeout: float, what, interval: float = 0.25, gone=None):
    """pred()'s first true value within `timeout` s. `what` (a string, or a callable read only on failure, e.g. the
    job's log as it is then) says what did not happen; `gone()` true means it never will (the job has ended):
    fail at once instead of waiting out the timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if gone is not None and gone():
            v = pred()  # it may have happened just before the end
            if v:
                return v
            raise AssertionError(f"it ended first: {what() if callable(what) else what}")
        time.sleep(interval)
    raise TimeoutError(what() if callable(what) else what)


def job_over(job: str):
    """For wait_until(gone=...): the SLURM job has ended and will not run again (an empty answer, e.g. scontrol
    timing out under load, is not an end)."""
    return lambda: job_field(job, "JobState") in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL")


def tail(log: Path, n: int = 4000):
    """For wait_until(what=...): the log's end when the wait fails."""
    return lambda: log.read_text()[-n:] if log.exists() else f"(no {log})"


def logged_steps(run: Path) -> list[int]:
    try:
        return sorted(losses(run))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigterm_to_every_process_with_loader_workers_stops_requeues_and_resumes_the_same_trajectory(
    slurm_cluster, data, ref, tmp_path
):
    env = train_env(tmp_path)
    run = tmp_path / "run"
    job = sbatch(tmp_path, env, *args(data, run, *INJECT, "wandb.mode=disabled"))
    log = tmp_path / f"slurm-{job}.out"
    try:
        wait_until(lambda: len(logged_steps(run)) >= 5, 1500, tail(log), gone=job_over(job))
        # what preemption and the time limit do: TERM to every process of the step, loader workers included
        subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
        t_signal = time.time()
        wait_until(lambda: job_field(job, "Restarts") == "1", 600, tail(log), gone=job_over(job))
        stop_s = time.time() - t_signal
        wait_until(lambda: job_field(job, "JobState") == "COMPLETED", 1500, tail(log), gone=job_over(job))
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert "killed by signal" not in text and "Traceback" not in text, text[-4000:]
    rows = [m for m in metrics(run) if "train/loss" in m]
    first = [m["step"] for m in rows if m["restart"] == 0]
    second = [m["step"] for m in rows if m["restart"] == 1]
    assert f"resuming from {run}/checkpoints/step_{first[-1]:08d}" in text  # the stop checkpoint: no step lost
    assert first + second == list(range(1, STEPS + 1)), (first, second)
    assert same_losses({m["step"]: m["train/loss"] for m in rows}, losses(ref["run"]))
    assert equal(weights(complete_checkpoints(run)[-1]), weights(complete_checkpoints(ref["run"])[-1]))
    print(f"\nMEASURED sigterm: stop at step {first[-1]}, steps lost 0, {stop_s:.1f} s from signal to requeue")


# ------------------------------------------------------------- a finite gradient-norm spike: skipped, K abort
SPIKE_NORM = 1e3  # optim.skip_grad_norm of the test; the rehearsal's norms are far below, an injected spike far above


def test_finite_grad_norm_spikes_are_skipped_on_every_rank_and_k_in_a_row_abort_under_sbatch(
    slurm_cluster, data, tmp_path
):
    """2 ranks under sbatch, batch 1, 2 loader workers, grad_accum 2: rank 1's gradients x1e6 (finite) at steps
    3, 4 (skipped, the run goes on) and 6, 7, 8 (train.max_bad_steps=3 in a row: abort, exit 3, no requeue)."""
    env = train_env(tmp_path)
    run = tmp_path / "run"
    spikes = [3, 4, 6, 7, 8]
    job = sbatch(
        tmp_path,
        env,
        *args(
            data,
            run,
            "wandb.mode=disabled",
            "train.max_steps=10",
            f"optim.skip_grad_norm={SPIKE_NORM}",
            "train.debug_inject_finite_spike_steps=[" + ",".join(map(str, spikes)) + "]",
            "train.debug_inject_rank=1",
            "checkpoint.keep_last=4",
        ),
    )
    log = tmp_path / f"slurm-{job}.out"
    try:
        state = wait_until(
            lambda: (st := job_field(job, "JobState")) in ("FAILED", "CANCELLED", "COMPLETED") and st,
            1500,
            "the job did not end: " + (log.read_text()[-3000:] if log.exists() else ""),
        )
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert state == "FAILED" and job_field(job, "Restarts") == "0", text[-3000:]  # exit 3: not requeued
    assert job_field(job, "ExitCode").startswith("3:"), job_field(job, "ExitCode")
    assert json.loads((run / "logs" / "last_exit.json").read_text())["status"] == "aborted"
    assert "3 consecutive steps had a non-finite loss or gradient, or a gradient norm above" in text
    by_step = {m["step"]: m for m in metrics(run) if "train/loss" in m}
    assert sorted(by_step) == list(range(1, 9))
    assert [by_step[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 3, 4, 5]
    assert [by_step[s]["train/grad_spike_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 3, 4, 5]
    # the logged norm of a skipped spike is the global one (rank 1's x1e6 over both ranks), not DeepSpeed's inf
    assert all(
        math.isfinite(by_step[s]["train/grad_norm"]) and by_step[s]["train/grad_norm"] > SPIKE_NORM for s in spikes
    )
    assert all(by_step[s]["train/grad_norm"] < SPIKE_NORM / 10 for s in (1, 2, 5))
    assert all(math.isfinite(by_step[s]["train/loss"]) for s in by_step)  # the loss stays finite: a pure norm spike
    assert "SKIPPED (gradient norm above optim.skip_grad_norm=1000)" in text
    ck = {int(c.name[5:]): c for c in complete_checkpoints(run)}
    assert sorted(ck) == [2, 4, 6, 8], sorted(ck)
    # ZeRO-2: each rank updates its own partition, so equal consolidated weights = no rank applied the spike
    assert equal(weights(ck[2]), weights(ck[4])) and equal(weights(ck[6]), weights(ck[8]))
    assert not equal(weights(ck[4]), weights(ck[6]))  # step 5 trained
    state8 = json.loads((ck[8] / TRAINER_STATE).read_text())
    assert state8["reason"].startswith("abort") and state8["bad_streak"] == 3 and state8["grad_spike_steps"] == 5
    print(
        f"\nMEASURED finite spike: norms {[round(by_step[s]['train/grad_norm']) for s in spikes]} skipped; abort at 8"
    )


# ------------------------------------------- corrupt newest checkpoints, world-size change, K non-finite in a row
def corrupt(ckpt: Path, how: str) -> None:
    if how == "truncated":
        f = ckpt / TEMPORAL_WEIGHTS
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "no_complete":
        (ckpt / COMPLETE).unlink()
    elif how == "bad_json":
        (ckpt / TRAINER_STATE).write_text('{"step": 6, "world_')


def test_resume_skips_corrupt_newest_checkpoints_rewarms_the_lr_and_k_nonfinite_steps_abort(data, ref, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ref["run"] / "checkpoints", run / "checkpoints")
    ck = {int(c.name[5:]): c for c in complete_checkpoints(run)}
    corrupt(ck[8], "truncated")
    corrupt(ck[6], "bad_json")
    # 1 rank x 2 clips: the same global batch at another world size -> fresh Adam moments, LR re-warm-up (2 steps);
    # then rank 0's loss is NaN at steps 6, 7, 8: max_bad_steps=3 in a row -> abort, checkpoint, exit 3 (no requeue)
    proc = run_local(
        run,
        *args(data, run, "data.batch_size=2", "wandb.mode=disabled", "train.debug_inject_nonfinite_steps=[6,7,8]")[1:],
        nproc=1,
        timeout=1500,
        config=REHEARSAL,
    )
    assert proc.returncode == 3, describe(proc)
    out = proc.stdout
    assert f"resuming from {run}/checkpoints/step_00000004" in out
    assert "SKIPPED newer checkpoint(s): step_00000008 (temporal.safetensors unreadable" in out
    assert "step_00000006 (trainer_state.json unreadable" in out
    assert (run / "checkpoints" / f"{CORRUPT_PREFIX}step_00000008").is_dir()  # kept for a person, out of the way
    lrs = {m["step"]: m["train/lr"] for m in metrics(run) if "train/lr" in m}
    assert lrs[5] == pytest.approx(0.5e-3) and lrs[6] == pytest.approx(1e-3) and lrs[8] == pytest.approx(1e-3)
    assert "3 consecutive steps had a non-finite loss or gradient" in out
    last = complete_checkpoints(run)[-1]
    state = json.loads((last / TRAINER_STATE).read_text())
    assert last.name == "step_00000008" and state["reason"].startswith("abort") and state["bad_streak"] == 3
    assert json.loads((run / "logs" / "last_exit.json").read_text())["status"] == "aborted"
    # steps 6-8 skipped: the periodic checkpoint of step 6 and the abort one hold step 5's weights
    assert equal(weights(last), weights(run / "checkpoints" / "step_00000006"))
    assert not equal(weights(last), weights(run / "checkpoints" / "step_00000004"))  # step 5 trained


# --------------------------------------------------------------- cheap checks of the same code, in process
def fake_checkpoint(run: Path, step: int) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    t = {"a": torch.arange(1000, dtype=torch.float32)}
    save_file(t, str(d / TEMPORAL_WEIGHTS))
    save_file(t, str(d / TEMPORAL_EMA_WEIGHTS))
    (d / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": 2}))
    (d / COMPLETE).write_text(f"step {step}\n")
    return d


@pytest.mark.parametrize("how", ["truncated", "no_complete", "bad_json"])
def test_plan_resume_falls_back_past_a_corrupt_newest_checkpoint_and_says_why(tmp_path, how):
    run = tmp_path / "run"
    for s in (2, 4):
        fake_checkpoint(run, s)
    corrupt(run / "checkpoints" / "step_00000004", how)
    cfg = build_config(Config, [str(ROOT / "configs" / "tiny_cpu.yaml")], [f"run_dir={run}"])
    plan = plan_resume(cfg, 2)
    assert plan.path == run / "checkpoints" / "step_00000002" and plan.step == 2
    why = {"truncated": "temporal.safetensors unreadable", "no_complete": "no COMPLETE", "bad_json": "unreadable"}[how]
    assert "SKIPPED newer checkpoint(s): step_00000004 (" in plan.message and why in plan.message
    corrupt(run / "checkpoints" / "step_00000002", how)
    with pytest.raises(RuntimeError, match="no usable checkpoint in .*step_00000002"):
        plan_resume(cfg, 2)  # a fresh start would silently throw the run away


def test_lr_rewarmup_ramps_from_the_resume_step():
    from vldm.config.train import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="constant", rewarmup_steps=4)
    assert [lr_at(s, cfg, 100) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_at(s, cfg, 100, rewarmup_from=10) for s in range(10, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(12, OptimConfig(lr=1.0, rewarmup_steps=0), 100, rewarmup_from=10) == 1.0  # off


def test_loader_workers_ignore_stop_signals_and_the_loader_goes_on(data):
    import psutil

    from vldm.data import build_loader

    cfg = build_config(
        Config,
        [str(REHEARSAL)],
        args(data, data["root"] / "unused", "data.num_workers=2"),
    )
    it = iter(build_loader(cfg.data, rank=0, world_size=1, seed=0))
    first = [next(it)["keys"][0] for _ in range(2)]
    workers = [c for c in psutil.Process().children() if c.is_running()]
    assert len(workers) >= 2
    for w in workers:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(w.pid, s)
    time.sleep(1.0)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    more = [next(it)["keys"][0] for _ in range(6)]  # no "DataLoader worker ... killed by signal"
    assert len(set(first + more)) == 8


def test_a_process_whose_loader_workers_ignore_term_still_exits_with_the_loader_open(data, tmp_path):
    """The trainer ends with its loader still open (the batch iterator lives as long as the run): at exit,
    multiprocessing terminates daemonic children with SIGTERM and joins them, which workers that ignore
    SIGTERM would never answer. The run must exit anyway (seen: a finished run hanging at exit)."""
    script = tmp_path / "open_loader.py"
    script.write_text(
        "import sys\n"
        "from vldm.config import Config, build_config\n"
        "from vldm.data import build_loader\n"
        "cfg = build_config(Config, [sys.argv[1]], sys.argv[2:])\n"
        "IT = iter(build_loader(cfg.data, rank=0, world_size=1, seed=0))\n"
        "print(next(IT)['keys'][0], flush=True)\n"
    )
    argv = [str(a) for a in args(data, tmp_path / "unused", "data.num_workers=2")]
    proc = subprocess.run(
        [sys.executable, str(script), str(REHEARSAL), *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ file system full during a save
def test_file_system_full_during_a_save_keeps_the_previous_checkpoint_and_names_the_path(data, tmp_path):
    from vldm.train.checkpointing import checkpoint_problem

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    # one checkpoint of this model and 2 ranks is ~12 MB: room for the first save, not for the second beside it
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=18m", "tmpfs", str(ckdir)], check=True, timeout=30)
    try:
        proc = run_local(
            run,
            *args(data, run, "wandb.mode=disabled", "train.max_steps=4")[1:],
            nproc=2,
            timeout=1500,
            config=REHEARSAL,
        )
        assert proc.returncode not in (0, 75), describe(proc)  # an error a person must see, not a requeue
        out = proc.stdout + proc.stderr
        assert "checkpoint save of step 4 failed on rank" in out and f"writing into {ckdir}/.tmp-step_00000004" in out
        assert f"the previous complete checkpoint {ckdir}/step_00000002 is intact" in out
        assert [c.name for c in complete_checkpoints(run)] == ["step_00000002"]
        assert checkpoint_problem(ckdir / "step_00000002", "temporal") is None  # intact, loadable
        cfg = build_config(Config, [str(REHEARSAL)], args(data, run))
        assert plan_resume(cfg, 2).path == ckdir / "step_00000002"  # what the restart resumes from
    finally:
        subprocess.run(["umount", "-l", str(ckdir)], timeout=60)


# ----------------------------------------------------------------------------------- a rank SIGKILLed mid-step
def rank_pid(run: Path, rank: int) -> int | None:
    """The pid of training rank `rank` of the run (not one of its loader workers: those are its children)."""
    pids = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if Path(cmd[0].decode(errors="replace")).name == "srun":
            continue  # srun's command line names the run too, and the batch step's env has SLURM_PROCID=0
        if f"run_dir={run}".encode() in cmd and b"vldm.train" in cmd and f"SLURM_PROCID={rank}".encode() in env:
            pids[int(d.name)] = ppid
    top = [p for p, pp in pids.items() if pp not in pids]
    return top[0] if len(top) == 1 else None


def test_a_rank_sigkilled_mid_step_ends_the_job_and_the_resubmission_resumes_from_the_newest_complete(
    slurm_cluster, data, tmp_path
):
    from vldm.train.checkpointing import checkpoint_problem

    env = train_env(tmp_path)
    run = tmp_path / "run"
    job = sbatch(
        tmp_path, env, *args(data, run, "wandb.mode=disabled", "train.max_steps=100", "deepspeed.timeout_s=30")
    )
    log = tmp_path / f"slurm-{job}.out"
    try:
        wait_until(lambda: len(logged_steps(run)) >= 5, 1500, tail(log), gone=job_over(job))
        pid = wait_until(lambda: rank_pid(run, 1), 60, "rank 1 not found")
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        state = wait_until(
            lambda: (st := job_field(job, "JobState")) in ("FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL") and st,
            300,
            "the job did not end: " + log.read_text()[-3000:],
        )
        end_s = time.time() - t_kill
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"):
            subprocess.run(["scancel", job], timeout=30)
    assert state == "FAILED" and job_field(job, "Restarts") == "0", log.read_text()[-3000:]  # not requeued
    assert end_s < 60, end_s  # srun --kill-on-bad-exit; deepspeed.timeout_s=30 bounds a survivor stuck in gloo
    killed_at = max(logged_steps(run))
    steps = [c.name for c in (run / "checkpoints").iterdir()]
    assert all(n.startswith(("step_", ".tmp-")) for n in steps), steps
    done = complete_checkpoints(run)
    assert [c.name for c in done] == sorted(n for n in steps if n.startswith("step_"))  # nothing partial published
    assert all(checkpoint_problem(c, "temporal") is None for c in done) and done
    newest = done[-1]
    # resubmitted (the same command), it resumes from the newest complete checkpoint
    job2 = sbatch(tmp_path, env, *args(data, run, "wandb.mode=disabled", f"train.max_steps={int(newest.name[5:]) + 1}"))
    assert (
        wait_until(
            lambda: job_field(job2, "JobState") in ("COMPLETED", "FAILED") and job_field(job2, "JobState"),
            1500,
            "job 2",
        )
        == "COMPLETED"
    )
    text = (tmp_path / f"slurm-{job2}.out").read_text()
    assert f"resuming from {newest}" in text, text[-3000:]
    print(
        f"\nMEASURED sigkill: killed rank 1 after step {killed_at}, job ended in {end_s:.1f} s, "
        f"newest complete {newest.name}"
    )


def test_a_stop_signal_during_start_up_is_honoured_at_the_first_step(tmp_path):
    """USR1/TERM can come while torch, DeepSpeed and the model still load (a requeued job preempted again at
    once): the rank must not die of the default action, it stops after step 1 with a checkpoint."""
    import sys

    run = tmp_path / "run"
    env = {k: v for k, v in train_env(tmp_path).items() if k not in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID")}
    cmd = [sys.executable, "-m", "vldm.train", "--config", "configs/tiny_cpu.yaml", f"run_dir={run}"]
    proc = subprocess.Popen(
        [*cmd, "train.max_steps=5", "wandb.mode=disabled", "train.count_flops=false"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.5)  # inside the imports (several seconds on any machine)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 75, out[-4000:]
    assert "stopped at step 1 (signal SIGUSR1)" in out, out[-4000:]
    assert [c.name for c in complete_checkpoints(run)] == ["step_00000001"]


# ------------------------------------------------------------------ W&B's service process dies or hangs mid-run
def wandb_core_of(run: Path) -> int | None:
    """The wandb-core process started by the run's rank 0 (its parent's command line names the run dir)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"wandb-core" not in (d / "cmdline").read_bytes():
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if f"run_dir={run}".encode() in Path(f"/proc/{ppid}/cmdline").read_bytes():
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def fault_after_step_3(proc: subprocess.Popen, run: Path, fault) -> tuple[str, int, float, float]:
    """Once the launcher `proc` has logged step 3, `fault()`; then wait for its end (killed if it outlives the
    wait). -> (its output, the last step logged at the fault, s from the fault to the end, s from the last
    metrics line to the end)."""
    try:
        wait_until(lambda: len(logged_steps(run)) >= 3, 1200, "no step 3", gone=lambda: proc.poll() is not None)
        fault()
        t_fault, step_at = time.time(), max(logged_steps(run))
        out, _ = proc.communicate(timeout=600)
        after_last_step = time.time() - (run / "logs" / "metrics.jsonl").stat().st_mtime
        return out, step_at, time.time() - t_fault, after_last_step
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_wandb_service_killed_or_hung_mid_run_falls_back_to_an_offline_run_with_every_later_step(
    data, ref, tmp_path, sig
):
    """The W&B service process (wandb-core) of rank 0 SIGKILLed (dies) or SIGSTOPped (hangs) at step 3 of a
    rehearsal run with W&B offline files: the run reaches max_steps with the reference's losses, exits 0 within
    the bounds (wandb.call_timeout_s / finish_timeout_s), and every step is in metrics.jsonl. W&B goes on in a
    fresh offline run under the same run id: across the failed run's file (the prefix its service had flushed)
    and the fallback's, every step is there exactly once, in order, with the reference's losses."""
    from vldm.eval.wandb_reader import history, run_info
    from vldm.train.logger import run_id_for

    run = tmp_path / "run"
    env = {**train_env(tmp_path, wandb=True), "NPROC": "2"}
    over = ["wandb.mode=offline", "wandb.call_timeout_s=5", "wandb.finish_timeout_s=10"]
    cmd = ["bash", "slurm/train_temporal.sbatch", str(REHEARSAL), *args(data, run, *INJECT, *over)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, step_at, total_s, after_last_step = fault_after_step_3(
            proc,
            run,
            lambda: os.kill(wait_until(lambda: wandb_core_of(run), 30, "no wandb-core"), getattr(signal, sig)),
        )
    finally:
        if sig == "SIGSTOP" and wandb_core_of(run):
            os.kill(wandb_core_of(run), signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]
    assert "Traceback" not in out, out[-6000:]
    assert same_losses(losses(run), losses(ref["run"]))  # training unaffected
    assert sorted(losses(run)) == list(range(1, STEPS + 1))  # every step on disk, those after the kill too
    assert "the job goes on in a fresh OFFLINE run under the same run id" in out, out[-4000:]
    assert "W&B is OFF" not in out, out[-4000:]
    # the failed run's directory, then the fallback's (W&B names them by the second they started)
    files = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    rows = [[r for r in history(f) if "train/loss" in r] for f in files]
    assert rows[1], "the fallback run's file holds no row"
    assert f"wandb sync {files[1].parent}" in out or f"{files[0].parent} {files[1].parent}" in out, out[-4000:]
    run_id = run_id_for(build_config(Config, [str(REHEARSAL)], [f"run_dir={run}"]))
    assert all(run_info(f)["id"] == run_id for f, r in zip(files, rows) if r)  # the same run: `wandb sync` continues it
    steps = [r["trainer/global_step"] for part in rows for r in part]
    # each step exactly once across the two files: the failed service's flushed prefix (0 to step_at rows seen),
    # then the fallback's re-logged rows and every later one
    assert steps == list(range(1, STEPS + 1)), [[r["trainer/global_step"] for r in part] for part in rows]
    assert same_losses({r["trainer/global_step"]: r["train/loss"] for part in rows for r in part}, losses(ref["run"]))
    print(
        f"\nMEASURED wandb {sig} at step {step_at}: exit 0, {total_s:.1f} s from signal to exit, "
        f"{after_last_step:.1f} s from the last metrics line to exit; failed run's file steps 1..{len(rows[0])}, "
        f"fallback offline run steps {len(rows[0]) + 1}..{STEPS}"
    )


def test_wandb_server_gone_mid_run_finish_is_bounded_and_the_online_run_file_holds_every_step(data, ref, tmp_path):
    """The W&B SERVER going away after a successful online init, rehearsed with a STAND-IN: the real server is a
    container image that cannot run here, so tests/wandb_standin.py (stdlib http.server on loopback) answers
    what wandb-core asks for an online run (GraphQL, the file stream, uploads) and is stopped at step 3, its
    port closed. What this shows is what the SDK and the trainer do when a server that answered stops
    answering: log() goes on returning at once (the service writes the run file and retries the upload in the
    background), wandb.finish waits for the upload and is cut at wandb.finish_timeout_s, the run exits 0 with
    the reference's losses, and the online run's local file (run-*-ID/run-ID.wandb) holds every step once,
    for `wandb sync --include-online`. Not shown: what W&B's real server answers, or how it takes the resync."""
    from wandb_standin import WandbStandIn

    from vldm.eval.wandb_reader import history, run_info
    from vldm.train.logger import run_id_for

    run = tmp_path / "run"
    with WandbStandIn() as server:
        env = {**train_env(tmp_path, wandb=True), "NPROC": "2", "WANDB_BASE_URL": server.url}
        env.update(WANDB_API_KEY="k" * 40)
        env.pop("WANDB_MODE")  # the config's mode (online) decides
        over = ["wandb.mode=online", "wandb.call_timeout_s=5", "wandb.finish_timeout_s=10"]
        cmd = ["bash", "slurm/train_temporal.sbatch", str(REHEARSAL), *args(data, run, *INJECT, *over)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ops: set = set()
        out, step_at, total_s, after_last_step = fault_after_step_3(
            proc, run, lambda: (ops.update(op for _, _, op in server.requests), server.stop())
        )
    assert proc.returncode == 0, out[-6000:]
    assert "Traceback" not in out, out[-6000:]
    assert "UpsertBucket" in ops, ops  # the init created the run on the stand-in: an online run
    assert "could not reach the server" not in out, out[-4000:]
    assert same_losses(losses(run), losses(ref["run"]))  # training unaffected
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert "finish did not return within 10 s" in out, out[-4000:]  # the upload never completes: bounded
    run_id = run_id_for(build_config(Config, [str(REHEARSAL)], [f"run_dir={run}"]))
    online = sorted((tmp_path / "wandb_home" / "wandb").glob(f"run-*-{run_id}/run-{run_id}.wandb"))
    assert len(online) == 1, online
    assert run_info(online[0])["id"] == run_id
    # with any rows the service had not flushed when it was stopped re-logged in an offline fallback run
    fallback = sorted((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = [[r for r in history(f) if "train/loss" in r] for f in [*online, *fallback]]
    steps = [r["trainer/global_step"] for part in rows for r in part]
    assert steps == list(range(1, STEPS + 1)), [[r["trainer/global_step"] for r in part] for part in rows]
    assert same_losses({r["trainer/global_step"]: r["train/loss"] for part in rows for r in part}, losses(ref["run"]))
    print(
        f"\nMEASURED W&B server (stand-in) gone at step {step_at}: exit 0, {total_s:.1f} s from the stop to exit, "
        f"{after_last_step:.1f} s from the last metrics line to exit; online run file steps 1..{len(rows[0])}, "
        f"offline fallback {len(steps) - len(rows[0])} rows; the stand-in got {len(server.requests)} requests, "
        f"{len(server.history)} history rows before it stopped"
    )


# ----------------------------------------------------------------------------------- the SLURM time limit itself
def log_times(text: str, what: str, prefix: str = "[train_temporal ") -> list[float]:
    """Seconds of the day of the log lines that start with `prefix` + HH:MM:SS and contain `what`: the sbatch
    script's (`[train_temporal HH:MM:SS] ...`, the default) or rank 0's (`0: [vldm.train HH:MM:SS] ...`)."""
    out = []
    for line in text.splitlines():
        if line.startswith(prefix) and what in line:
            h, m, s = line[len(prefix) : len(prefix) + 8].split(":")
            out.append(int(h) * 3600 + int(m) * 60 + int(s))
    return out


def submit_limited(tmp: Path, env: dict, script: Path, *opts_and_overrides: str) -> str:
    """`sbatch --parsable [the CPU EDIT options] SBATCH_OPTIONS... SCRIPT REHEARSAL OVERRIDES...`: the job id.
    Items of `opts_and_overrides` that start with "--" are sbatch's, the others the trainer's."""
    opts = [a for a in opts_and_overrides if a.startswith("--")]
    overrides = [a for a in opts_and_overrides if not a.startswith("--")]
    cmd = ["sbatch", "--parsable", *SBATCH_OPTS, *opts, f"--output={tmp}/slurm-%j.out"]
    cmd += [str(script), str(REHEARSAL), *overrides]
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    return job.strip().split(";")[0]


def finish_after_the_first_requeue(job: str, log: Path) -> None:
    """Wait for the first requeue, then give the requeued job a long limit so that the rest of the run is one more
    job (each 1-minute job trains only a few steps on 2 loaded cores), and wait for it to complete."""
    try:
        wait_until(lambda: int(job_field(job, "Restarts") or 0) >= 1, 600, "never requeued: " + str(log), 1.0)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], timeout=30, check=True)
        wait_until(lambda: job_field(job, "JobState") == "COMPLETED", 900, "not completed: " + str(log), 1.0)
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)


def assert_the_same_trajectory(run: Path, ref_run: Path) -> list[dict]:
    """Each step once (0 steps lost at every stop), the uninterrupted run's losses and final weights."""
    rows = [m for m in metrics(run) if "train/loss" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1)), [(m["step"], m["restart"]) for m in rows]
    assert same_losses({m["step"]: m["train/loss"] for m in rows}, losses(ref_run))
    assert equal(weights(complete_checkpoints(run)[-1]), weights(complete_checkpoints(ref_run)[-1]))
    return rows


def test_a_real_time_limit_with_the_early_warning_stops_requeues_and_resumes_the_same_trajectory(
    slurm_cluster, data, ref, tmp_path
):
    """`sbatch --time=1 --signal=B:USR1@30`: SLURM itself sends the warning 30 s before the job's 1-minute
    limit (slurmctld checks limits every ~30 s: it comes 30-60 s into the job, 30 s before the kill); every rank
    stop-checkpoints, the job is requeued with a fresh limit; the requeued job (its limit raised by the test, to
    keep the test short) resumes and finishes: the losses are the uninterrupted run's."""
    env = train_env(tmp_path)
    run = tmp_path / "run"
    job = submit_limited(
        tmp_path, env, SBATCH, "--time=1", "--signal=B:USR1@30", *args(data, run, *INJECT, "wandb.mode=disabled")
    )
    log = tmp_path / f"slurm-{job}.out"
    # one real warning -> stop checkpoint -> requeue is the row; after it the job gets a long limit
    finish_after_the_first_requeue(job, log)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    restarts = int(job_field(job, "Restarts"))
    assert restarts >= 1, text[-4000:]  # SLURM's own warning stopped at least one job of the run
    assert_the_same_trajectory(run, ref["run"])
    warned, requeued = log_times(text, "got USR1"), log_times(text, "requeueing job")
    assert len(requeued) == restarts and len(warned) >= restarts
    print(
        f"\nMEASURED time limit (--time=1, USR1@30): {restarts} requeue(s), 0 steps lost, "
        f"{[r - w for w, r in zip(warned, requeued)]} s from SLURM's warning to the requeue"
    )


def test_a_real_time_limit_without_the_early_warning_stops_at_the_term_requeues_and_resumes_the_same_trajectory(
    slurm_cluster, data, ref, tmp_path
):
    """The script as a user who left out `#SBATCH --signal` has it: at the limit SLURM sends SIGCONT and SIGTERM
    to every process of the job (batch shell, srun, ranks, loader workers) and SIGKILL KillWait s later (30 s on the
    local cluster, SLURM's default; with 5 s a loaded CI machine did not finish step 7 before the KILL). The batch
    shell sees the limit (squeue's reason TimeLimit) and requeues at once; the ranks stop-checkpoint at the end of
    their step; the requeued job resumes from that checkpoint and finishes with the uninterrupted run's losses. For
    the limit to come mid-run whatever the machine's speed, the job starts with a limit long enough to reach step 6;
    the test then SIGSTOPs both ranks (frozen inside the next step) and lowers the limit to 1 minute, passed by then:
    slurmctld's next check (every ~30 s) ends the job, and its kill sequence
    sends the SIGCONT that wakes the ranks before the TERM."""
    script = tmp_path / "train_temporal.sbatch"
    lines = SBATCH.read_text().splitlines(keepends=True)
    script.write_text("".join(ln for ln in lines if not ln.startswith("#SBATCH --signal")))
    assert len(script.read_text().splitlines()) == len(lines) - 1  # exactly the --signal line is gone
    env = train_env(tmp_path)
    run = tmp_path / "run"
    # deepspeed.timeout_s: the watchdog's clock runs while the ranks are frozen (up to ~30 s); it does not
    # change the trajectory
    over = args(data, run, *INJECT, "wandb.mode=disabled", "deepspeed.timeout_s=300")
    job = submit_limited(tmp_path, env, script, "--time=10", *over)
    log = tmp_path / f"slurm-{job}.out"
    try:
        pids = wait_until(
            lambda: (p := [rank_pid(run, r) for r in (0, 1)]) and all(p) and p, 600, "no ranks: " + str(log), 1.0
        )
        # frozen after step 6: the step they are in (7) is neither periodic (every 2) nor the last
        wait_until(lambda: len(logged_steps(run)) >= 6, 900, tail(log), gone=job_over(job))
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = max(logged_steps(run))
        assert frozen_at == 6, frozen_at
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], timeout=30, check=True)
    except BaseException:
        subprocess.run(["scancel", job], timeout=30)  # its kill sequence continues stopped ranks too
        raise
    finish_after_the_first_requeue(job, log)
    text = log.read_text()
    assert "DUE TO TIME LIMIT" in text and "got USR1" not in text, text[-4000:]  # the limit itself, no warning
    assert "reached its time limit without an early warning" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert int(job_field(job, "Restarts")) >= 1, text[-4000:]
    rows = assert_the_same_trajectory(run, ref["run"])
    first = [m["step"] for m in rows if m["restart"] == 0]
    # the step the ranks were frozen in is finished and saved: not one step lost
    assert first[-1] == frozen_at + 1 and f"stopped at step {first[-1]} (signal SIG" in text, (
        frozen_at,
        first,
        text[-4000:],
    )
    assert f"step_{first[-1]:08d} (stop: signal SIG" in text  # its own stop checkpoint, not a periodic one
    assert f"resuming from {run}/checkpoints/step_{first[-1]:08d}" in text, text[-4000:]
    (term,), (requeued,) = log_times(text, "got TERM"), log_times(text, "requeueing job")
    (saved,) = log_times(text, f"stopped at step {first[-1]}", "0: [vldm.train ")
    (restart,) = log_times(text, f"job {job} restart 1")
    print(
        f"\nMEASURED time limit without the warning (KillWait 30 s): stop checkpoint at step {first[-1]} (frozen "
        f"in it), 0 steps lost; TERM -> requeue {requeued - term} s, TERM -> stop checkpoint saved {saved - term} s, "
        f"requeue -> restart {restart - requeued} s"
    )


def test_a_refused_requeue_is_logged_with_the_checkpoint_to_resume_from_and_the_job_exits_75(
    slurm_cluster, data, tmp_path
):
    """`sbatch --no-requeue` (or a cluster with JobRequeue=0): after a stop the ranks' checkpoint is saved but
    `scontrol requeue` is refused. The log says so and names the checkpoint to resume from, and the job exits 75
    ("run again"), not 0: it will not come back by itself."""
    env = train_env(tmp_path)
    run = tmp_path / "run"
    job = submit_limited(tmp_path, env, SBATCH, "--no-requeue", *args(data, run, "wandb.mode=disabled"))
    log = tmp_path / f"slurm-{job}.out"
    try:
        wait_until(lambda: len(logged_steps(run)) >= 3, 900, tail(log), gone=job_over(job))
        subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
        state = wait_until(
            lambda: (st := job_field(job, "JobState")) in ("FAILED", "CANCELLED", "COMPLETED") and st,
            300,
            "the job did not end: " + str(log),
        )
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert state == "FAILED" and job_field(job, "Restarts") == "0", text[-3000:]
    assert job_field(job, "ExitCode").startswith("75:"), job_field(job, "ExitCode")
    stop = complete_checkpoints(run)[-1]
    assert f"stopped at step {int(stop.name[5:])} (signal SIGTERM)" in text, text[-3000:]
    assert f"scontrol requeue {job} refused (exit 1: Requested operation is presently disabled" in text, text[-3000:]
    assert f"resubmit the same command to resume from {stop}" in text, text[-3000:]

"""Video decoder fine-tuning (stage=decoder) through the same launcher as the other stages: the sbatch
script with local ranks, DDP over gloo. 2 ranks x 1 clip = 1 rank x 2 clips; a stop (step budget or a
USR1 to one rank only) is agreed by every rank, saved by rank 0, and resumes the same trajectory; the
decoder section lives in the one config schema, so a bad key fails before any rank starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, describe, losses, metrics, run_local, spawn_ranks, train_env

from vldm.checkpoint import complete_checkpoints
from vldm.models.base import build_tiny_base

CONFIG = ROOT / "configs" / "decoder_tiny.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("decoder_base") / "base", with_text=False)


def args(base: Path, *extra: str) -> list[str]:
    return [
        f"model.pretrained={base}",
        "wandb.mode=disabled",
        f"train.max_steps={STEPS}",
        "checkpoint.every=2",
        "checkpoint.keep_last=5",
        "data.size=16",
        "data.num_frames=4",
        "decoder.disc_channels=8",
        "deepspeed.timeout_s=90",
        *extra,
    ]


def decoder_weights(ck: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((ck / "video_decoder").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def ref_run(base, tmp_path_factory) -> Path:
    """2 ranks x 1 clip, STEPS steps, uninterrupted."""
    run = tmp_path_factory.mktemp("decoder_ref") / "run"
    proc = run_local(run, *args(base, "data.batch_size=1"), nproc=2, config=CONFIG)
    assert proc.returncode == 0, describe(proc)
    assert "rank 0/2 via env" in proc.stdout
    return run


def test_two_ranks_train_checkpoint_and_match_one_rank_at_the_same_global_batch(ref_run, base, tmp_path):
    assert [c.name for c in complete_checkpoints(ref_run)] == ["step_00000002", "step_00000004", "step_00000006"]
    last = complete_checkpoints(ref_run)[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["loader"]) == 2
    assert {"discriminator.safetensors", "optimizer.pt", "config.yaml", "COMPLETE"} <= {p.name for p in last.iterdir()}
    assert json.loads((ref_run / "logs" / "last_exit.json").read_text())["status"] == "done"
    ref = losses(ref_run)
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(v == v for v in ref.values())
    assert all("train/d_loss" in m and "train/adaptive_weight" in m for m in metrics(ref_run))  # the GAN ran

    run = tmp_path / "run"
    proc = run_local(run, *args(base, "data.batch_size=2"), nproc=1, config=CONFIG)
    assert proc.returncode == 0, describe(proc)
    one = {m["step"]: m for m in metrics(run)}
    two = {m["step"]: m for m in metrics(ref_run)}
    for step in two:
        for key in ("train/loss", "train/l1", "train/d_loss", "train/adaptive_weight"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-4, abs=1e-6), (step, key)
    a, b = decoder_weights(complete_checkpoints(run)[-1]), decoder_weights(last)
    moved = decoder_weights(complete_checkpoints(ref_run)[0])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(not torch.equal(moved[k], b[k]) for k in b)  # it trains between checkpoints
    da = load_file(str(complete_checkpoints(run)[-1] / "discriminator.safetensors"))
    db = load_file(str(last / "discriminator.safetensors"))
    assert max((da[k] - db[k]).abs().max().item() for k in da) < 1e-5


def test_two_ranks_stop_checkpoint_and_resume_the_same_trajectory(ref_run, base, tmp_path):
    run = tmp_path / "run"
    first = run_local(run, *args(base, "data.batch_size=1", "train.stop_after_steps=3"), nproc=2, config=CONFIG)
    assert first.returncode == 75, describe(first)
    assert "stopped after a checkpoint" in first.stdout
    assert json.loads((run / "logs" / "last_exit.json").read_text())["status"] == "stopped"
    assert complete_checkpoints(run)[-1].name == "step_00000003"  # saved at the agreed stop step
    second = run_local(run, *args(base, "data.batch_size=1"), nproc=2, config=CONFIG)
    assert second.returncode == 0, describe(second)
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    got, ref = losses(run), losses(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # weights, both Adam states and each rank's data position restored: the uninterrupted run's losses
    assert got == pytest.approx(ref, rel=1e-6)
    a, b = decoder_weights(complete_checkpoints(run)[-1]), decoder_weights(complete_checkpoints(ref_run)[-1])
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_usr1_to_one_rank_stops_every_rank_at_the_same_step(base, tmp_path):
    run = tmp_path / "run"
    procs = spawn_ranks(
        [
            "-m",
            "vldm.train",
            "--config",
            str(CONFIG),
            f"run_dir={run}",
            *args(base, "data.batch_size=1", "train.max_steps=2000", "checkpoint.every=1000"),
        ],
        2,
        train_env(tmp_path),
        tmp_path,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "logs" / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
            assert procs[0].poll() is None, (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the step's all-reduce
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log0 = (tmp_path / "rank0.log").read_text()
    assert codes == [75, 75], log0[-3000:]
    assert "another rank was signalled" in log0
    status = json.loads((run / "logs" / "last_exit.json").read_text())
    ck = complete_checkpoints(run)
    assert status["status"] == "stopped" and [c.name for c in ck] == [f"step_{status['step']:08d}"]
    assert json.loads((ck[0] / "trainer_state.json").read_text())["world_size"] == 2


def test_decoder_section_is_in_the_schema_and_a_bad_key_fails_before_launch(base, tmp_path):
    env = train_env(tmp_path)
    ref = subprocess.run(
        [sys.executable, "-m", "vldm.config", "--reference"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "`decoder.disc_weight`" in ref.stdout and "'decoder'" in ref.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "vldm.train", "--config", str(CONFIG), f"model.pretrained={base}", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "stage=decoder" in ok.stderr, ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "vldm.train",
            "--config",
            str(CONFIG),
            f"model.pretrained={base}",
            "decoder.disc_wieght=1",
            "--check",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "decoder.disc_wieght" in bad.stderr and "disc_weight" in bad.stderr
    lp = subprocess.run(
        [
            sys.executable,
            "-m",
            "vldm.train",
            "--config",
            str(CONFIG),
            f"model.pretrained={base}",
            "decoder.lpips_weight=1",
            "--check",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lp.returncode == 2 and "decoder.lpips_weights" in lp.stderr
    # the sbatch pre-flight: no rank starts
    run = tmp_path / "run"
    proc = run_local(run, f"model.pretrained={base}", "decoder.disc_wieght=1", nproc=2, config=CONFIG)
    assert proc.returncode != 0 and "decoder.disc_wieght" in proc.stderr
    assert "local:" not in proc.stdout and not run.exists()


def test_slurm_usr1_requeues_and_the_decoder_run_resumes(slurm_cluster, base, tmp_path):
    """Under real SLURM (2 nodes x 1 rank): USR1 to the batch shell -> every rank stops at one step and
    rank 0 saves -> `scontrol requeue` -> the requeued job resumes and finishes; every step logged once."""
    from test_train_runs import wait_job
    from train_helpers import SBATCH_OPTS, job_field

    run = tmp_path / "run"
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            *SBATCH_OPTS,
            f"--output={tmp_path}/slurm-%j.out",
            str(ROOT / "slurm" / "train_temporal.sbatch"),
            str(CONFIG),
            f"run_dir={run}",
            *args(base, "data.batch_size=1", "train.max_steps=200", "checkpoint.every=1000"),
        ],
        cwd=ROOT,
        env=train_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "logs" / "metrics.jsonl").exists() and len(metrics(run)) >= 3):
        assert job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    log = tmp_path / f"slurm-{job}.out"
    assert wait_job(job, 300) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert job_field(job, "Restarts") == "1" and "requeueing job" in text and "resumed from" in text, text[-3000:]
    final = json.loads((run / "logs" / "last_exit.json").read_text())
    assert final["status"] == "done" and final["step"] == 200 and final["restart"] == 1
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, 201))  # the stop step was saved: nothing trained twice, nothing lost

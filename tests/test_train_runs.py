"""Real multi-process training (DeepSpeed ZeRO-2 over gloo, the tiny config, synthetic data): under a
real SLURM cluster with two nodes, USR1 -> checkpoint -> requeue -> resume continues exactly the
uninterrupted run and W&B holds every step once; on one machine, the checkpoint holds only the trained
part, 1 rank = 2 ranks at the same global batch, resume at another world size, a killed rank ends the
job, and non-finite steps are skipped, counted and bounded. One uninterrupted reference run serves all."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    ROOT,
    STEPS,
    TINY,
    TINY_RUN,
    describe,
    free_port,
    job_field,
    losses,
    metrics,
    run_local,
    spawn_ranks,
    submit,
    train_env,
)

from vldm.checkpoint import complete_checkpoints, load_checkpoint_model
from vldm.eval.wandb_reader import history, metric_definitions, run_info

TWO_RANKS = [*TINY_RUN, "data.batch_size=1", "wandb.mode=disabled"]  # global batch 2
ONE_RANK = [*TINY_RUN, "data.batch_size=2", "wandb.mode=disabled"]  # global batch 2


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 ranks x 1 clip, STEPS steps, a checkpoint every 4."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = run_local(run, *TWO_RANKS, nproc=2)
    assert proc.returncode == 0, describe(proc)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    return run


def test_checkpoints_hold_only_the_trained_part(ref_run):
    ckpts = complete_checkpoints(ref_run)
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000008", "step_00000012", "step_00000016"]
    assert not [p for p in (ref_run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    last = ckpts[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["loader"]) == 2 and len(state["rng"]) == 2
    assert (ref_run / "logs" / "last_exit.json").exists() and json.loads(
        (ref_run / "logs" / "last_exit.json").read_text()
    )["status"] == "done"

    cfg, comps, model = load_checkpoint_model(last)  # the reader other tools use
    trainable = {k: v for k, v in model.temporal_state_dict().items()}
    frozen_names = {f"unet.{k}" for k in model.unet.state_dict()}
    n_trainable = sum(v.numel() for v in trainable.values())
    for name in ("temporal.safetensors", "temporal_ema.safetensors"):
        sd = load_file(str(last / name))
        assert set(sd) == set(trainable) and all(v.dtype == torch.float32 for v in sd.values())
    # DeepSpeed's files: module weights and ZeRO partitions of the temporal layers only
    ds = last / "deepspeed" / "zero"
    module = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert set(module) == set(trainable) and not set(module) & frozen_names  # format 2: the model's own names
    part_numel = 0
    for r in range(2):
        opt = torch.load(ds / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
        part_numel += sum(t.numel() for t in opt["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert n_trainable <= part_numel <= n_trainable + 2 * 64  # fp32 masters, split in two (alignment padding)
    # the checkpoint grows with the trained part, not the frozen model
    n_frozen = sum(p.numel() for p in model.unet.parameters())
    ckpt_bytes = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    assert ckpt_bytes < (n_trainable * 4) * 8 + 2_000_000 and n_frozen > 0


def test_one_rank_matches_two_ranks_at_the_same_global_batch(ref_run, tmp_path):
    run = tmp_path / "run"
    proc = run_local(run, *ONE_RANK, nproc=1)
    assert proc.returncode == 0, describe(proc)
    one, two = losses(run), losses(ref_run)
    assert sorted(one) == sorted(two)
    for step in two:
        assert one[step] == pytest.approx(two[step], rel=1e-4), (step, one[step], two[step])
    a = load_file(str(complete_checkpoints(run)[-1] / "temporal.safetensors"))
    b = load_file(str(complete_checkpoints(ref_run)[-1] / "temporal.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_resume_at_another_world_size_starts_a_fresh_optimizer_and_says_so(ref_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    proc = run_local(run, *ONE_RANK, "train.stop_after_steps=2", nproc=1)
    assert proc.returncode == 75, describe(proc)  # stopped after its 2 steps: rerun to continue
    assert "FRESH optimizer state (saved at world size 2, now 1)" in proc.stdout
    got = losses(run)
    assert sorted(got) == [5, 6]
    # step 5 runs on the consolidated weights of step 4 and the same clips: same loss as the reference
    assert got[5] == pytest.approx(losses(ref_run)[5], rel=1e-4)
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
    assert any(m.get("ckpt/resumed_with_fresh_optimizer") == 1.0 for m in metrics(run))


def test_a_killed_rank_ends_the_job_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    env = train_env(tmp_path)
    procs = spawn_ranks(
        [
            "-m",
            "vldm.train",
            "--config",
            "configs/tiny_cpu.yaml",
            f"run_dir={run}",
            "train.max_steps=500",
            "checkpoint.every=1000",
            "data.batch_size=1",
            "wandb.mode=disabled",
            "deepspeed.timeout_s=30",
        ],
        2,
        env,
        tmp_path,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((run / "logs" / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
            assert procs[0].poll() is None, (tmp_path / "rank0.log").read_text()
            time.sleep(0.5)
        assert len(metrics(run)) >= 2
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0].wait(timeout=90)  # the survivor must not hang: gloo error or the watchdog ends it
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc != 0 and waited < 60, (rc, waited, (tmp_path / "rank0.log").read_text()[-3000:])


NAN_SCRIPT = textwrap.dedent("""
    import sys
    from vldm.config import Config, build_config
    from vldm.train.sources import SyntheticClips
    from vldm.train.trainer import train

    BAD = {2, 4, 5, 6}  # steps whose batch on rank 1 holds a NaN (grad_accum 1: batch n = step n)

    class NaNClips(SyntheticClips):
        def __next__(self):
            batch = super().__next__()
            if self.rank == 1 and self.batches in BAD:
                batch["latents"][0, 0, 0, 0, 0] = float("nan")
            return batch

    cfg = build_config(Config, ["configs/tiny_cpu.yaml"], sys.argv[1:])
    src = NaNClips(cfg, int(__import__("os").environ["RANK"]), 2, 4, 16, 16)
    sys.exit(train(cfg, source=src))
""")


def test_non_finite_steps_are_skipped_counted_and_bounded(tmp_path):
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_SCRIPT)
    run = tmp_path / "run"
    procs = spawn_ranks(
        [
            str(script),
            f"run_dir={run}",
            "train.max_steps=20",
            "train.max_bad_steps=3",
            "checkpoint.every=1",
            "checkpoint.keep_last=20",
            "data.batch_size=1",
            "wandb.mode=disabled",
        ],
        2,
        train_env(tmp_path),
        tmp_path,
    )
    codes = [p.wait(timeout=300) for p in procs]
    log0 = (tmp_path / "rank0.log").read_text()
    assert codes == [3, 3], log0[-4000:]  # ABORT_EXIT: not a requeue
    assert "3 consecutive steps had a non-finite loss or gradient" in log0
    w = {c.name: load_file(str(c / "temporal.safetensors")) for c in complete_checkpoints(run)}
    ema = {c.name: load_file(str(c / "temporal_ema.safetensors")) for c in complete_checkpoints(run)}
    assert sorted(w) == [f"step_{s:08d}" for s in range(1, 7)]  # aborted at step 6, nothing after

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(w["step_00000001"], w["step_00000002"]) and same(ema["step_00000001"], ema["step_00000002"])  # skipped
    assert not same(w["step_00000002"], w["step_00000003"])  # a good step in between trains
    assert same(w["step_00000003"], w["step_00000006"])  # the abort checkpoint holds the last good weights
    assert all(torch.isfinite(t).all() for t in w["step_00000006"].values())
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 4 and state["bad_streak"] == 3 and state["reason"].startswith("abort")
    by_step = {m["step"]: m for m in metrics(run) if "train/loss" in m}
    assert by_step[2]["train/loss"] != by_step[2]["train/loss"]  # NaN is logged as NaN, not hidden
    assert by_step[3]["train/skipped_steps"] == 1 and by_step[6]["train/skipped_steps"] == 4


# ---------------------------------------------------------------------------------------------- SLURM
REQUIRED = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/skipped_steps",
    "perf/clips_per_s",
    "perf/clips_per_s_per_gpu",
    "perf/tokens_per_s",
    "perf/step_time_s",
    "perf/data_wait_frac",
    "perf/peak_mem_gb",
    "perf/tflops_per_gpu",
)


def sbatch(tmp_path: Path, env: dict, *args: str) -> str:
    return submit(TINY, tmp_path, env, *args)


def wait_job(job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = job_field(job, "JobState")
        if st in states:
            return st
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    raise TimeoutError(f"job {job} still {job_field(job, 'JobState')} after {timeout} s")


def test_slurm_preemption_requeues_and_resumes_the_same_trajectory(slurm_cluster, ref_run, tmp_path):
    env = train_env(tmp_path, wandb=True)
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", *TWO_RANKS[:-1], "wandb.mode=offline"]  # the reference's run, with W&B offline
    job = sbatch(tmp_path, env, *overrides)
    log = tmp_path / f"slurm-{job}.out"
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "logs" / "metrics.jsonl").exists() and losses(run)):
        assert job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            log.read_text() if log.exists() else job
        )
        time.sleep(0.2)
    # what SLURM does --signal=B:USR1@grace seconds before the time limit, now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    assert wait_job(job, 300) == "COMPLETED", log.read_text()[-5000:]
    text = log.read_text()
    assert job_field(job, "Restarts") == "1", text[-3000:]
    assert "got USR1" in text and "requeueing job" in text and "restart 1:" in text
    final = json.loads((run / "logs" / "last_exit.json").read_text())
    assert final["status"] == "done" and final["step"] == STEPS and final["restart"] == 1

    # every step exactly once over the two jobs, and the same losses as the uninterrupted run
    rows = [m for m in metrics(run) if "train/loss" in m]
    by_job = {r: [m["step"] for m in rows if m["restart"] == r] for r in (0, 1)}
    assert by_job[0] and by_job[1] and by_job[0] + by_job[1] == list(range(1, STEPS + 1)), by_job
    assert f"resuming from {run}/checkpoints/step_{by_job[0][-1]:08d}" in text
    # bit for bit: weights, Adam moments, fp32 masters, EMA, data position all restored exactly
    ref = losses(ref_run)
    assert {m["step"]: m["train/loss"] for m in rows} == ref
    for name in ("temporal.safetensors", "temporal_ema.safetensors"):
        a = load_file(str(complete_checkpoints(run)[-1] / name))
        b = load_file(str(complete_checkpoints(ref_run)[-1] / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # W&B offline: one run id over both jobs, every metric, every step once against trainer/global_step
    files = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    infos = [run_info(f) for f in files]
    assert infos[0]["id"] == infos[1]["id"] and infos[0]["group"] == "tiny_cpu"
    hist = [row for f in files for row in history(f)]
    steps = [row["trainer/global_step"] for row in hist if "train/loss" in row]
    assert steps == list(range(1, STEPS + 1))
    keys = set().union(*hist)
    assert set(REQUIRED) <= keys and {"ckpt/save_s", "ckpt/restore_s"} <= keys, sorted(keys)
    defs = metric_definitions(files[0])
    assert defs.get("train/*") == "trainer/global_step" and defs.get("perf/*") == "trainer/global_step"


def test_slurm_bad_config_fails_the_job_before_srun(slurm_cluster, tmp_path):
    job = sbatch(tmp_path, train_env(tmp_path), f"run_dir={tmp_path / 'run'}", "optim.lrr=1")
    assert wait_job(job, 120) == "FAILED"
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert "optim.lrr" in text and "did you mean 'lr'" in text
    assert "vldm.train " not in text and "restart 0" not in text  # no srun step, no rank


# ----------------------------------------------------------------------------------- real shards
def make_shards(root: Path) -> Path:
    """A tiny moving-shapes corpus sharded with the sharder's plain functions (no Ray)."""
    from vldm.config.data import ShardConfig, SyntheticConfig
    from vldm.data.clips import ClipSpec
    from vldm.data.plan import make_plan
    from vldm.data.report import aggregate
    from vldm.data.shards import write_shard
    from vldm.data.sources import list_inputs
    from vldm.data.synthetic import write_corpus

    write_corpus(SyntheticConfig(output=str(root / "videos"), count=8, size="32", frames=16, fps=8, seed=3))
    cfg = ShardConfig(
        input=str(root / "videos"), output=str(root / "shards"), videos_per_shard=4, frames=8, fps=8, size="32"
    )
    (root / "shards").mkdir(parents=True)
    records, dups = list_inputs(cfg.input, ("mp4",))
    spec = ClipSpec.from_config(cfg)
    plan = make_plan(cfg, records, dups, spec)
    for i in range(plan.num_shards):
        write_shard(root / "shards", plan.shard_name(i), plan.shard_inputs(i), spec, run_id="t")
    aggregate(root / "shards", plan, {"run_id": "t", "elapsed": 1.0})
    return root / "shards"


def test_shards_vae_and_text_encoder_with_exact_loader_resume(tmp_path):
    from vldm.models.base import build_tiny_base

    base = build_tiny_base(tmp_path / "base", vae_channels=(8, 8))  # VAE factor 2, CLIP text encoder
    shards = make_shards(tmp_path)
    run = tmp_path / "run"
    args = [
        f"model.pretrained={base}",
        f"data.shards={shards}",
        "data.size=32",
        "data.num_frames=4",
        "data.frame_stride=2",
        "data.batch_size=2",
        "data.shuffle_buffer=4",
        "train.max_steps=4",
        "checkpoint.every=100",
        "wandb.mode=disabled",
    ]
    first = run_local(run, *args, "train.stop_after_steps=2", nproc=2)
    assert first.returncode == 75, describe(first)
    assert "stopped after a checkpoint: run the same command again to resume" in first.stdout
    second = run_local(run, *args, nproc=2)
    assert second.returncode == 0, describe(second)
    assert "resuming from" in second.stdout and "step_00000002" in second.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4]
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    # each rank's loader went on from its own position: 4 batches in all, none read twice
    assert [(s["batches"], sum(map(sum, s["consumed"]))) for s in state["loader"]] == [(4, 8), (4, 8)], state["loader"]
    assert all(s["stats"]["batches"] == 4 and s["stats"]["samples"] == 8 for s in state["loader"])


def test_image_stage_with_class_labels_then_export_for_the_temporal_stage(tmp_path):
    """The driving recipe in miniature: a class-conditional image UNet trained on frames (unet/ +
    unet_ema/ in the checkpoint), exported as a base model the temporal stage accepts."""
    run = tmp_path / "run"
    env = {
        **train_env(tmp_path),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vldm.train",
            "--config",
            str(TINY),
            f"run_dir={run}",
            "stage=image",
            "train.max_steps=2",
            "model.unet.num_class_embeds=3",
            "diffusion.label_key=label",
            "diffusion.class_names=[day,night]",
            "wandb.mode=disabled",
            "data.batch_size=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, describe(proc)
    ckpt = complete_checkpoints(run)[-1]
    assert (ckpt / "unet" / "config.json").exists() and (
        ckpt / "unet_ema" / "diffusion_pytorch_model.safetensors"
    ).exists()
    assert not (ckpt / "temporal.safetensors").exists()
    _, _, unet = load_checkpoint_model(ckpt, ema=True)
    assert type(unet).__name__ == "UNet2DConditionModel" and unet.config.num_class_embeds == 3
    from vldm.train.export import export

    base = export(run, tmp_path / "base")
    assert sorted(p.name for p in base.iterdir()) == ["scheduler", "unet"]
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "vldm.train",
            "--config",
            str(TINY),
            f"model.pretrained={base}",
            "data.use_latents=true",
            "model.temporal.num_class_labels=2",
            "diffusion.label_key=label",
            "--check",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr

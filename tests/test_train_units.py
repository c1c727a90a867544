"""The trainer's parts, in process: LR, EMA, rank discovery, stop flag, DeepSpeed config, data position,
the objective's independence from how a batch is split, FLOP accounting, and config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import ROOT, SBATCH, TINY, train_env

from vldm.config import Config, ConfigError, build_config, reference
from vldm.train.dist import World, detect_world
from vldm.train.ema import EMA
from vldm.train.engine import deepspeed_config
from vldm.train.lr import lr_at
from vldm.train.preflight import check
from vldm.train.signals import REQUEUE_EXIT, StopRequest, process_exit_code
from vldm.train.sources import SyntheticClips

MY_CONFIGS = ("tiny_cpu.yaml", "sd15_t2v.yaml", "sd21_t2v.yaml", "driving_image.yaml", "driving_temporal.yaml")


def tiny(*overrides: str) -> Config:
    return build_config(Config, [str(TINY)], list(overrides))


def test_lr_warmup_then_cosine_to_floor():
    cfg = tiny("optim.lr=1.0", "optim.warmup_steps=4", "optim.schedule=cosine", "optim.min_lr_ratio=0.1").optim
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(100, cfg, 14) == pytest.approx(0.1)
    const = tiny("optim.lr=2.0", "optim.warmup_steps=0", "optim.schedule=constant").optim
    assert {lr_at(s, const, 10) for s in range(10)} == {2.0}


def test_ema_tracks_trainable_parameters_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("temporal.w", p)], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    ema.update()
    assert torch.allclose(ema.tensors(strip_prefix="temporal.")["w"], torch.full((3,), 1 - 0.81))
    other = EMA([("temporal.w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2 and torch.equal(other.shadow[0], ema.shadow[0])
    off = EMA([("temporal.w", p)], decay=0.0)
    off.update()
    assert torch.equal(off.tensors()["temporal.w"], p.detach())  # no EMA: the weights themselves


def test_ema_warmup_forgets_the_initialisation_and_resumes_the_same_decay():
    """train.ema_warmup: decay min(d, (1 + n) / (10 + n)) after n updates; after 150 updates at d = 0.99 the
    initial weights keep prod(decays) ~ 1e-6 of the EMA instead of 0.99^150 = 22 %."""
    p = torch.nn.Parameter(torch.zeros(1))
    plain, warm = EMA([("w", p)], decay=0.99), EMA([("w", p)], decay=0.99, warmup=True)
    with torch.no_grad():
        p.fill_(1.0)
    assert warm.current_decay() == 0.1 and plain.current_decay() == 0.99
    for _ in range(150):
        plain.update()
        warm.update()
    init_share = {name: 1 - e.tensors()["w"].item() for name, e in (("plain", plain), ("warm", warm))}
    assert abs(init_share["plain"] - 0.99**150) < 1e-5 and init_share["warm"] < 1e-5, init_share
    # the decay is a function of the update count, which the checkpoint holds: a resume continues it
    resumed = EMA([("w", p)], decay=0.99, warmup=True)
    resumed.load_state_dict(warm.state_dict())
    assert resumed.current_decay() == warm.current_decay() == 151 / 160
    late = EMA([("w", p)], decay=0.9, warmup=True)
    late.num_updates = 1000
    assert late.current_decay() == 0.9  # never above the decay set


def test_rank_discovery_from_launchers():
    env_launch = detect_world(
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    )
    assert env_launch == World(1, 4, 1, "h0", 1234, "env")
    srun = detect_world(
        {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "3",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "77",
            "MASTER_ADDR": "n1",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr, srun.master_port, srun.launcher) == (
        3,
        4,
        1,
        "n1",
        20077,
        "slurm",
    )
    # the batch step has SLURM_PROCID and SLURM_NTASKS too, but no SLURM_STEP_ID: it is not rank 0 of N
    batch = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "MASTER_PORT": "29500"})
    assert batch.world_size == 1 and batch.launcher == "single"
    with pytest.raises(RuntimeError, match="outside world size"):
        detect_world({"RANK": "2", "WORLD_SIZE": "2"})


def test_stop_request_from_signal_and_step_budget():
    stop = StopRequest(stop_after_steps=3)
    try:
        assert not stop.local(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while stop.signal_name is None and time.time() < deadline:
            time.sleep(0.01)
        assert stop.local(1) and stop.reason(1) == "signal SIGUSR1"
    finally:
        stop.restore()
    budget = StopRequest(stop_after_steps=3, install=False)
    assert not budget.local(2) and budget.local(3) and "stop_after_steps" in budget.reason(3)
    # under srun a stop exits 0 (kill-on-bad-exit); the sbatch script reads logs/last_exit.json
    assert process_exit_code(REQUEUE_EXIT, "slurm") == 0 and process_exit_code(REQUEUE_EXIT, "env") == REQUEUE_EXIT
    assert process_exit_code(3, "slurm") == 3


def test_deepspeed_config_is_built_from_the_typed_config():
    cfg = tiny(
        "data.batch_size=3",
        "train.grad_accum=4",
        "optim.grad_clip=0.5",
        "deepspeed.overlap_comm=false",
        "deepspeed.reduce_bucket_size=1000",
    )
    ds = deepspeed_config(cfg, world_size=8, precision="bf16")
    assert ds["train_batch_size"] == 3 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and "optimizer" not in ds
    z = ds["zero_optimization"]
    assert z["stage"] == 2 and z["overlap_comm"] is False and z["reduce_bucket_size"] == 1000
    fp16 = deepspeed_config(cfg, 8, "fp16")
    assert fp16["fp16"]["enabled"] and "bf16" not in fp16
    assert "bf16" not in deepspeed_config(cfg, 8, "fp32") and "fp16" not in deepspeed_config(cfg, 8, "fp32")


def test_synthetic_batches_do_not_depend_on_the_split_or_an_interruption():
    one = SyntheticClips(tiny("data.batch_size=4"), 0, 1, 4, 8, 8)
    r0, r1 = (SyntheticClips(tiny("data.batch_size=2"), r, 2, 4, 8, 8) for r in (0, 1))
    for _ in range(3):
        whole, a, b = next(one), next(r0), next(r1)
        assert torch.equal(whole["latents"], torch.cat([a["latents"], b["latents"]]))
        assert whole["captions"] == a["captions"] + b["captions"]
    # the position carries over to another world size with the same global batch
    again = SyntheticClips(tiny("data.batch_size=4"), 0, 1, 4, 8, 8)
    again.load_state_dict(r0.state_dict())
    assert torch.equal(next(again)["latents"], next(one)["latents"])
    # frames of a moving clip are shifted copies of its first frame: something for the temporal layers to learn
    batch = next(one)
    moving = [i for i, c in enumerate(batch["captions"]) if "still" not in c][0]
    clip, direction = batch["latents"][moving], batch["meta"][moving]["direction"]
    dy, dx = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    assert torch.equal(clip[:, 1], torch.roll(clip[:, 0], shifts=(dy, dx), dims=(1, 2)))


@pytest.fixture(scope="module")
def tiny_objective():
    from vldm.train.build import build
    from vldm.train.objective import Objective

    cfg = tiny("diffusion.text_dropout=0.5", "train.image_ratio=0.3", "data.num_frames=2")
    built = build(cfg)
    return cfg, built, Objective(cfg, built, torch.device("cpu"))


def test_loss_is_the_same_whichever_rank_holds_a_clip(tiny_objective):
    cfg, built, obj = tiny_objective
    whole = next(
        SyntheticClips(build_config(Config, [str(TINY)], ["data.batch_size=4", "data.num_frames=2"]), 0, 1, 4, 4, 4)
    )
    halves = [next(SyntheticClips(cfg, r, 2, 4, 4, 4)) for r in (0, 1)]
    with torch.no_grad():
        l_whole, n = obj.loss(built.model, whole, step=5, micro=0, rank=0)
        l_halves = [obj.loss(built.model, h, step=5, micro=0, rank=r)[0] for r, h in enumerate(halves)]
    assert n == 4
    assert torch.allclose(l_whole, torch.stack(l_halves).mean(), rtol=1e-5)
    with torch.no_grad():
        l_other_step, _ = obj.loss(built.model, whole, step=6, micro=0, rank=0)
    assert not torch.allclose(l_whole, l_other_step)  # noise and timesteps change with the step


def test_every_section_is_documented_in_the_reference():
    rows = {key: help_ for key, _, _, help_ in reference(Config)}
    for key in (
        "train.max_bad_steps",
        "train.image_ratio",
        "checkpoint.every",
        "checkpoint.keep_last",
        "checkpoint.resume",
        "deepspeed.zero_stage",
        "deepspeed.precision",
        "deepspeed.overlap_comm",
        "deepspeed.reduce_bucket_size",
        "wandb.mode",
        "wandb.group",
        "diffusion.label_key",
        "task_options",
    ):
        assert rows.get(key), key


@pytest.mark.parametrize("name", MY_CONFIGS)
def test_shipped_configs_parse(name):
    cfg = build_config(Config, [str(ROOT / "configs" / name)])
    assert cfg.train.max_steps >= 1


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("model.pretrained=/nonexistent/sd15", "model.pretrained"),
        ("diffusion.label_key=weather", "diffusion.label_key"),
        ("deepspeed.precision=fp16", "deepspeed.precision"),
        ("task=nosuchtask", "task"),
    ],
)
def test_bad_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(build_config(Config, [str(TINY)], [override]), cuda=False)


def test_prediction_type_of_a_frozen_image_unet_cannot_change(tmp_path):
    """stage=temporal keeps the image UNet frozen: diffusion.prediction_type must be what it predicts."""
    import json

    base = tmp_path / "base"  # the layout preflight reads: unet/, scheduler/scheduler_config.json (SD-1.5's)
    (base / "unet").mkdir(parents=True)
    (base / "scheduler").mkdir()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    model = [f"model.pretrained={base}", "data.use_latents=true"]
    for ok in ("auto", "epsilon"):
        check(build_config(Config, [str(TINY)], model + [f"diffusion.prediction_type={ok}"]), cuda=False)
    v = model + ["diffusion.prediction_type=v_prediction"]
    with pytest.raises(ConfigError, match=r"diffusion\.prediction_type.*'v_prediction'.*'epsilon'"):
        check(build_config(Config, [str(TINY)], v), cuda=False)
    check(build_config(Config, [str(TINY)], v + ["stage=image"]), cuda=False)  # the image UNet trains: allowed


def test_pixel_space_model_needs_no_vae_and_refuses_one(tmp_path):
    """model.pixel_space (the pixel-space upsampler): a base directory without vae/ trains on pixel shards (its
    targets are the pixels); a vae/ or latent shards contradict it and are refused naming the key."""
    export = tmp_path / "upscaler"  # what `python -m vldm.train.export` writes for a pixel-space image stage
    (export / "unet").mkdir(parents=True)
    up = ROOT / "configs" / "paper_upsample.yaml"
    temporal = ["stage=temporal", f"model.pretrained={export}"]
    check(build_config(Config, [str(up)], temporal), cuda=False)
    with pytest.raises(ConfigError, match=r"data\.use_latents: false needs a VAE"):
        check(build_config(Config, [str(up)], temporal + ["model.pixel_space=false"]), cuda=False)
    with pytest.raises(ConfigError, match=r"model\.pixel_space"):
        check(build_config(Config, [str(up)], temporal + ["data.use_latents=true"]), cuda=False)
    (export / "vae").mkdir()
    with pytest.raises(ConfigError, match=r"model\.pixel_space"):
        check(build_config(Config, [str(up)], temporal), cuda=False)


def test_bad_config_fails_before_any_rank_starts(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        ["bash", str(SBATCH), str(TINY), f"run_dir={tmp_path / 'run'}", "train.max_stepz=5"],
        cwd=ROOT,
        env=train_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.max_stepz" in proc.stderr and "did you mean 'max_steps'" in proc.stderr
    assert "vldm.train " not in proc.stdout + proc.stderr  # no rank printed anything: none started
    assert not (tmp_path / "run").exists()
    assert time.time() - t0 < 60
    # the module entry point says the same
    direct = subprocess.run(
        [sys.executable, "-m", "vldm.train", "--config", str(TINY), "optim.lr=fast", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert direct.returncode == 2 and "optim.lr" in direct.stderr


def test_help_documents_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "vldm.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--check" in out.stdout and "key=value" in out.stdout
    sb = subprocess.run(["bash", str(SBATCH), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert sb.returncode == 0 and "sbatch slurm/train_temporal.sbatch" in sb.stdout and "USR1" in sb.stdout

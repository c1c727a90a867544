"""Each model of the cascade trains a few steps through the real entry point (`python -m vldm.train`
with the tiny configs, one process, fp32, synthetic data), leaves a COMPLETE checkpoint with finite
losses, and that checkpoint loads into the sampling stage that uses it. Also: the interpolation
model's fps condition with data.frame_stride > 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, describe, free_port, losses, train_env

from vldm.checkpoint import complete_checkpoints
from vldm.config import Config, build_config
from vldm.config.sample import SampleConfig
from vldm.models.base import build_tiny_base
from vldm.sample import stages
from vldm.sample.api import Cascade, _text, generate
from vldm.sample.runs import load_decoder, load_stage
from vldm.sample.stages import Run, TextInputs

CONFIGS = ROOT / "configs"
FEW = ["train.max_steps=2", "checkpoint.every=2", "wandb.mode=disabled", "deepspeed.precision=fp32"]


def train(tmp_path: Path, config: str, *overrides: str) -> Path:
    """One process of `python -m vldm.train`; returns the run directory after checking its checkpoint."""
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
        [sys.executable, "-m", "vldm.train", "--config", str(CONFIGS / config), f"run_dir={run}", *FEW, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, describe(proc)
    ck = complete_checkpoints(run)
    assert ck and ck[-1].name == "step_00000002" and (ck[-1] / "COMPLETE").exists(), list(run.rglob("*"))
    got = losses(run)
    assert sorted(got) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in got.values()), got
    return run


def sample_run(steps: int = 2) -> Run:
    return Run(SampleConfig(steps=steps, guidance_scale=2.0, context_guidance=1.5), [0])


def text_for(stage, comps) -> TextInputs:
    cond, uncond = _text(comps, ["a red texture moving left"], "", True, stage.model.device, stage.model.dtype)
    return TextInputs(cond, uncond)


def test_prediction_model_trains_and_rolls_out_a_long_video(tmp_path):
    run = train(tmp_path, "predict_tiny.yaml", "data.batch_size=1")
    stage, comps = load_stage(run)
    assert stage.task == "predict" and stage.clip_frames == 6
    out = generate(Cascade(keyframes=stage, components=comps), "a texture", num_frames=9, steps=2, progress=False)
    assert out.frames["keyframes"] == 9 and torch.isfinite(out.videos).all()


def test_interpolation_model_trains_and_fills_frames_between_key_frames(tmp_path):
    run = train(tmp_path, "interpolate_tiny.yaml")
    stage, comps = load_stage(run)
    assert stage.task == "interpolate" and {"fps", "stage"} <= set(stage.model.opts.scalar_conds)
    keys = torch.randn(1, 4, 3, 4, 4)
    video = stages.interpolate(stage, text_for(stage, comps), sample_run(), keys, 1, 32.0)
    assert video.shape == (1, 4, 9, 4, 4) and torch.equal(video[:, :, ::4], keys)


def test_latent_upsampler_trains_on_an_x4_upscaler_and_upsamples(tmp_path):
    from vldm.models.upsampler import build_tiny_upscaler

    base = build_tiny_upscaler(tmp_path / "upscaler")
    run = train(
        tmp_path,
        "tiny_cpu.yaml",
        "task=upsample",
        f"model.pretrained={base}",
        "data.use_latents=false",
        "data.size=32",
        "data.batch_size=1",
        "task_options.patch_size=4",
    )
    stage, comps = load_stage(run)
    assert stage.task == "upsample" and stage.model.unet.config.in_channels == 7
    low = torch.rand(1, 3, 3, 8, 8) * 2 - 1  # 8x8 pixels -> 32x32 pixels = 8x8 latents of the VAE (factor 4)
    z = stages.upsample(stage, text_for(stage, comps), sample_run(), low, (8, 8))
    assert z.shape == (1, 4, 3, 8, 8) and torch.isfinite(z).all()


@pytest.mark.parametrize("stage_name", ["temporal", "image"])
def test_pixel_upsampler_trains_both_stages_and_upsamples(tmp_path, stage_name):
    """The driving case: an x4 upscaler UNet on pixels, the noise level as its class label; stage=image
    pre-trains that image UNet on frames (the task's level goes in as the UNet's class label)."""
    run = train(tmp_path, "upsample_tiny.yaml", f"stage={stage_name}", "data.batch_size=1")
    ck = complete_checkpoints(run)[-1]
    assert (ck / ("unet" if stage_name == "image" else "temporal.safetensors")).exists()
    stage, comps = load_stage(run)
    assert stage.task == "upsample" and stage.model.unet.config.num_class_embeds == 351
    low = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    x = stages.upsample(stage, text_for(stage, comps), sample_run(), low, (32, 32))
    assert x.shape == (1, 3, 4, 32, 32) and torch.isfinite(x).all()


def test_video_decoder_trains_through_the_trainer_entry_point_and_decodes(tmp_path):
    base = build_tiny_base(tmp_path / "base", with_text=False)
    run = train(
        tmp_path,
        "decoder_tiny.yaml",
        f"model.pretrained={base}",
        "data.size=16",
        "data.num_frames=4",
        "decoder.disc_channels=8",
        "data.batch_size=1",
    )
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["stage"] == "decoder" and state["world_size"] == 1
    decoder = load_decoder(run)
    video = decoder.decode(torch.randn(1, 4, 5, 4, 4), window=4, overlap=1)
    assert video.shape == (1, 3, 5, 16, 16) and torch.isfinite(video).all()


# ------------------------------------------------------------------------------ fps with a frame stride
def _fps_by_stage(task, z, batch) -> dict[int, list[float]]:
    seen: dict[int, list[float]] = {}
    for seed in range(16):
        conds = task.training_inputs(z, batch, torch.Generator().manual_seed(seed)).model_kwargs["conditions"]
        seen[int(conds["stage"][0])] = conds["fps"].tolist()
    return seen


def test_interpolation_fps_condition_divides_the_stored_rate_by_the_frame_stride():
    from vldm.train.build import build
    from vldm.train.objective import Objective

    cfg = build_config(Config, [str(CONFIGS / "interpolate_tiny.yaml")], ["data.frame_stride=3"])
    built = build(cfg, load_encoders=False)
    objective = Objective(cfg, built, torch.device("cpu"))
    z = torch.zeros(2, 4, 17, 2, 2)
    # clips cut every 3rd frame of 24 and 12 fps videos run at 8 and 4 fps; stage 0 keeps every 4th frame of that
    batch = objective.task_batch({"latents": z, "meta": [{"fps": 24.0}, {"fps": 12.0}]})
    assert _fps_by_stage(built.task, z, batch) == {1: [8.0, 4.0], 0: [2.0, 1.0]}
    # no stored rate: task_options.fps is the clips' own rate (8 in the tiny config), not divided again
    batch = objective.task_batch({"latents": z, "meta": [{}, {}]})
    assert _fps_by_stage(built.task, z, batch) == {1: [8.0, 8.0], 0: [2.0, 2.0]}
    # the sampler's fps_out for one pass from 2 fps key frames (SampleConfig.fps * factor) is stage 1's rate
    assert SampleConfig(fps=2.0).fps * 4 == 8.0

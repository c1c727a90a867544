"""The paper row's pixel-space x4 upscaler (configs/paper_upsample.yaml) learns to upsample: its image stage,
overfit on ONE 128 px clip with the trainer's own objective, task and EMA (vldm.train.objective,
UpsampleTask, vldm.train.ema), upsamples that clip back from 32 px through `stages.upsample` from its EMA
weights (noise level 50, 10 DDIM steps: what the row exports and samples) far above noise.

Under epsilon-prediction the same run outputs noise (~5 dB at a loss of 0.06-0.13): at high noise an
epsilon error becomes an x0 error sqrt((1 - abar) / abar) times larger (14.6x at t = 999 of this schedule,
whose last abar is 0.0047), so DDIM's first steps start from garbage; v-prediction (the SD x4 upscaler's)
has no such factor. And at the row's step counts the EMA (decay 0.99) must not keep its random
initialisation (0.99^150 = 22 %): train.ema_warmup. docs/paper.md, the upsampler row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from train_helpers import ROOT

from vldm.config import Config, build_config
from vldm.config.data import SyntheticConfig
from vldm.config.sample import SampleConfig
from vldm.data.synthetic import make_video
from vldm.diffusion import make_scheduler, scheduler_config
from vldm.models.video_unet import VideoLDMUNet
from vldm.paper import metrics as M
from vldm.paper import upsampler as row
from vldm.paper.run import Paper
from vldm.sample import stages
from vldm.tasks.paper import make_lowres, noise_augment
from vldm.train.build import build
from vldm.train.ema import EMA
from vldm.train.objective import Objective

CONFIG = ROOT / "configs" / "paper_upsample.yaml"
SIZE = row.SCALE * row.LOW  # the row's 128 px
FRAMES = 4  # frames of the clip: each is one training image per step (stage=image)
STEPS = 160


def one_clip() -> torch.Tensor:
    """(1, 3, f, 128, 128) in [-1, 1]: a clip of the row's training corpus (seed 2, one shape, its speeds)."""
    cfg = SyntheticConfig(
        output="unused",
        size=str(SIZE),
        frames=FRAMES,
        seed=row.TRAIN_SEED,
        max_shapes=1,
        min_speed=0.04,
        max_speed=0.08,
    )
    frames, _ = make_video(cfg, 0)
    return rearrange(torch.from_numpy(frames).float().div(127.5).sub(1), "f h w c -> 1 c f h w")


@pytest.fixture(scope="module")
def overfit():
    """The row's config (stage=image, from scratch) trained STEPS steps on one clip by the trainer's objective and
    EMA; the image UNet with the EMA weights."""
    torch.manual_seed(0)
    clip = one_clip()
    cfg = build_config(Config, [str(CONFIG)], [f"data.size={SIZE}", f"data.num_frames={FRAMES}", "data.batch_size=1"])
    assert cfg.stage == "image" and cfg.model.pixel_space
    built = build(cfg)
    objective = Objective(cfg, built, torch.device("cpu"))
    unet = built.model
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.optim.lr)
    ema = EMA(trainable, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
    batch = {"pixels": clip, "captions": [""], "meta": [{}]}
    losses = []
    for step in range(STEPS):
        loss, _ = objective.loss(unet, batch, step, 0, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        losses.append(loss.item())
    unet.load_state_dict(ema.tensors(), strict=False)
    unet.eval().requires_grad_(False)
    return cfg, built, clip, losses


def _psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([M.psnr(a, b) for a, b in zip(Paper.to_u8(x), Paper.to_u8(truth))]))


def test_the_overfit_image_upscaler_upsamples_its_clip_back_far_above_noise(overfit):
    cfg, built, clip, losses = overfit
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses  # it trained
    stage = stages.StageModel(
        model=VideoLDMUNet.from_unet2d(built.model).eval(),
        task=cfg.task,
        task_options=dict(cfg.task_options),
        clip_frames=FRAMES,
        size=SIZE,
        scheduler_config=scheduler_config(cfg.diffusion, built.comps.scheduler_config),
    )
    frames = rearrange(clip, "b c f h w -> (b f) c h w")
    low = rearrange(F.interpolate(frames, scale_factor=1 / row.SCALE, mode="area"), "(b f) c h w -> b c f h w", b=1)
    sample_cfg = SampleConfig(
        steps=10, guidance_scale=1.0, upsample_noise_level=row.NOISE_LEVEL, upsample_window=FRAMES
    )
    text = stages.TextInputs(torch.zeros(1, 1, built.comps.text_dim))
    with torch.no_grad():
        x = stages.upsample(stage, text, stages.Run(sample_cfg, [0]), low, (SIZE, SIZE), image_mode=True)
    bicubic = rearrange(
        F.interpolate(rearrange(low, "b c f h w -> (b f) c h w"), scale_factor=row.SCALE, mode="bicubic"),
        "(b f) c h w -> b c f h w",
        b=1,
    )
    got, floor = _psnr(x.clamp(-1, 1), clip), _psnr(bicubic.clamp(-1, 1), clip)
    # noise measures 3-6 dB; bicubic ~30 dB. 80 steps on one clip do not reach bicubic, but must be far from noise
    assert got > 15.0, f"upscaler PSNR {got:.2f} dB (bicubic {floor:.2f} dB), losses {losses[::10]}"


def test_its_clean_image_estimate_holds_at_high_noise(overfit):
    """What DDIM's first steps rest on: the x0 the model implies at t = 900 (from a correctly noised input),
    near its estimate at low noise, not the ~6 dB an epsilon model of the same loss gives."""
    cfg, built, clip, _ = overfit
    sched = make_scheduler(scheduler_config(cfg.diffusion, built.comps.scheduler_config), "ddpm")
    x0 = clip[:, :, 0]
    g = torch.Generator().manual_seed(1)
    lowres = noise_augment(make_lowres(clip[:, :, :1], row.SCALE, (SIZE, SIZE))[:, :, 0], torch.tensor([50]), g)
    t = torch.tensor([900])
    a = sched.alphas_cumprod[t]
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t)
    with torch.no_grad():
        out = built.model(
            torch.cat([xt, lowres], 1),
            t,
            encoder_hidden_states=torch.zeros(1, 1, built.comps.text_dim),
            class_labels=torch.tensor([50]),
        ).sample
    if sched.config.prediction_type == "v_prediction":
        est = a.sqrt() * xt - (1 - a).sqrt() * out
    else:
        est = (xt - (1 - a).sqrt() * out) / a.sqrt()
    got = 10 * math.log10(4.0 / F.mse_loss(est.clamp(-1, 1), x0).item())
    assert got > 15.0, f"x0 estimate at t = 900: {got:.2f} dB ({sched.config.prediction_type})"

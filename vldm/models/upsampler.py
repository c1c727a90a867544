"""The video upsampler's base models (paper §3.4): an image upscaler UNet made temporal with our layers.

For Stable Diffusion the base is the SD x4 latent upscaler: a UNet with in_channels 7 (4 latent + 3
low-res RGB channels concatenated) whose class embedding takes the noise-augmentation level (<= 350),
and a VAE with a downsampling factor of 4, so the low-res frames already sit on the latent grid of the
4x output. For the driving model the paper uses a pixel-space upsampler: the same contract with a UNet
on RGB (in_channels 3 + 3) and no VAE. `VideoLDMUNet` handles both: the low-res channels are part of
the image UNet's input and the level goes in as `unet_class_labels` (`UpsampleTask(condition_via="unet")`).

`build_tiny_upscaler` writes such a model in the SD upscaler directory layout (unet/, vae/,
text_encoder/, tokenizer/, scheduler/, low_res_scheduler/) for tests and the embedded demo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from vldm.config.model import UNetSpec
from vldm.models.base import SD_SCHEDULER, build_tiny_base
from vldm.tasks.paper import LOW_RES_SCHEDULE

MAX_NOISE_LEVEL = 350  # SD x4 upscaler: StableDiffusionUpscalePipeline(max_noise_level=350)

# The architecture of stabilityai/stable-diffusion-x4-upscaler's unet/config.json (as published), for
# building an untrained model of that shape; real weights load from a local directory instead.
SD_X4_UPSCALER_UNET = dict(
    in_channels=7,
    out_channels=4,
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, True, False),
    attention_head_dim=8,
    cross_attention_dim=1024,
    num_class_embeds=1000,
    use_linear_projection=True,
    norm_num_groups=32,
)


def is_upscaler_unet(unet: UNet2DConditionModel, latent_channels: int) -> bool:
    """An upscaler UNet takes the low-res channels in its own input and embeds the noise level."""
    return unet.config.in_channels > latent_channels and bool(unet.config.num_class_embeds)


def build_tiny_upscaler(
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    latent_channels: int = 4,
    lowres_channels: int = 3,
    seed: int = 0,
) -> Path:
    """A tiny random x4 upscaler in the SD upscaler layout.

    The VAE, text encoder and tokenizer are those of the tiny base (its VAE downsamples by 4, as the
    SD x4 upscaler's does); the UNet has in_channels = latent + low-res channels and a class embedding
    of MAX_NOISE_LEVEL + 1 rows for the noise level.
    """
    out = Path(out_dir)
    if base_dir is None:
        base_dir = build_tiny_base(out / "_base", seed=seed)
    base = Path(base_dir)
    for sub in ("vae", "text_encoder", "tokenizer"):
        if (base / sub).is_dir():
            shutil.copytree(base / sub, out / sub, dirs_exist_ok=True)
    unet_cfg = json.loads((base / "unet" / "config.json").read_text())
    spec = UNetSpec(
        in_channels=latent_channels + lowres_channels,
        out_channels=latent_channels,
        cross_attention_dim=unet_cfg["cross_attention_dim"],
        num_class_embeds=MAX_NOISE_LEVEL + 1,
    )
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**spec.diffusers_kwargs()).save_pretrained(str(out / "unet"))
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(str(out / "scheduler"))
    DDPMScheduler(**LOW_RES_SCHEDULE).save_pretrained(str(out / "low_res_scheduler"))
    return out


def load_low_res_scheduler(model_dir: str | Path | None) -> DDPMScheduler:
    """The upscaler's own noise-augmentation schedule (low_res_scheduler/), else SD x4's."""
    if model_dir and (Path(model_dir) / "low_res_scheduler").is_dir():
        return DDPMScheduler.from_pretrained(str(model_dir), subfolder="low_res_scheduler")
    return DDPMScheduler(**LOW_RES_SCHEDULE)

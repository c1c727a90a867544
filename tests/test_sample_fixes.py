"""Correctness of sampling (issue 13): per-sample randomness, latent channels, the one denoising loop."""

from __future__ import annotations

import pytest
import torch
from paper_helpers import tiny_unet

from vldm.config.sample import SampleConfig
from vldm.models.upsampler import MAX_NOISE_LEVEL
from vldm.sample import stages
from vldm.sample.stages import Run, TextInputs
from vldm.sample.tiny import stage_model


@pytest.fixture(scope="module")
def upscaler():
    """An upscaler-shaped stage: the UNet's input is 4 latent + 3 low-res channels, its output 4 channels."""
    unet = tiny_unet(in_channels=7, out_channels=4, num_class_embeds=MAX_NOISE_LEVEL + 1)
    return stage_model(unet, "upsample", {"patch_size": 4}, clip_frames=3, size=32)


def _text(b: int) -> TextInputs:
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 3, 32, generator=g).expand(b, -1, -1).contiguous()
    return TextInputs(cond=cond, uncond=torch.zeros(b, 3, 32))


def test_upsampler_sample_is_the_same_alone_and_inside_a_batch(upscaler):
    pixels = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = SampleConfig(steps=1, guidance_scale=1.0, upsample_noise_level=300)
    batch = stages.upsample(upscaler, _text(2), Run(cfg, [5, 6]), pixels, (8, 8))
    alone = stages.upsample(upscaler, _text(1), Run(cfg, [6]), pixels[1:], (8, 8))
    assert torch.allclose(batch[1:], alone, atol=1e-5), "the second sample depends on its batch"
    # the augmentation noise matters at this level: another seed gives another sample
    other = stages.upsample(upscaler, _text(1), Run(cfg, [8]), pixels[1:], (8, 8))
    assert (other - alone).abs().max() > 1e-3

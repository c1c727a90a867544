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


def _old_eval_sampler(model, ctx, neg, shape, seeds, sched_cfg, steps, scale, sampler, kw, ukw):
    """The eval pool's loop before it became `denoise` (main's vldm/diffusion/sampler.py:sample_latents),
    written out plainly: [uncond, cond] in one batch, eps = u + s (c - u)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    sched = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[sampler].from_config(sched_cfg)
    sched.set_timesteps(steps)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x * sched.init_noise_sigma
    both = {k: torch.cat([ukw[k], kw[k]]) for k in kw}
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        out = model(inp, t.expand(inp.shape[0]), torch.cat([neg, ctx]), **both)
        u, c = out.chunk(2)
        x = sched.step(u + scale * (c - u), t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler,steps", [("ddim", 2), ("dpm", 3)])  # 3: DPM-Solver's second-order step runs
def test_the_one_loop_reproduces_the_old_eval_sampler(sampler, steps):
    """The eval pool now samples through `denoise` (the cascade's loop) with the Conditioning it builds in
    vldm/eval/worker.py: same output as its old loop, class-label guidance included."""
    from vldm.diffusion import Conditioning, denoise, latent_channels
    from vldm.models.base import SD_SCHEDULER
    from vldm.models.video_unet import VideoLDMUNet
    from vldm.sample.tiny import perturb

    model = VideoLDMUNet.from_unet2d(tiny_unet(), num_class_labels=3).eval()
    perturb(model.temporal, scale=0.05)
    g = torch.Generator().manual_seed(3)
    ctx, neg = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    kw, ukw = {"class_labels": torch.tensor([0, 2])}, {"class_labels": torch.tensor([3, 3])}
    shape, seeds = (latent_channels(model), 2, 4, 4), [11, 12]
    old = _old_eval_sampler(model, ctx, neg, shape, seeds, dict(SD_SCHEDULER), steps, 4.0, sampler, kw, ukw)
    cond = Conditioning(
        {"encoder_hidden_states": ctx, **kw}, no_text={"encoder_hidden_states": neg, **ukw}, text_scale=4.0
    )
    new = denoise(model, shape, seeds, dict(SD_SCHEDULER), cond, steps=steps, sampler=sampler)
    assert new.shape == old.shape == (2, 4, 2, 4, 4)
    assert torch.allclose(new, old, atol=1e-5, rtol=1e-4), (new - old).abs().max()


def test_latent_channels_of_an_upscaler_are_its_output_channels(upscaler):
    from vldm.diffusion import latent_channels

    assert upscaler.model.unet.config.in_channels == 7  # latents + low-res frames in
    assert latent_channels(upscaler.model) == upscaler.latent_channels == 4  # latents out


def test_one_cross_fade_for_the_upsampler_and_the_decoder():
    from vldm.diffusion import windowed
    from vldm.models.windows import crossfade, window_starts, window_weights

    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7] and window_starts(4, 4, 1) == [0]
    assert window_weights(2, 11, 4, 2).tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert window_weights(0, 11, 4, 2).tolist() == pytest.approx([1, 1, 2 / 3, 1 / 3])  # no fade at the ends
    ones = crossfade(lambda s, e: torch.ones(1, 1, e - s, 1, 1), 11, 4, 2)
    assert torch.allclose(ones, torch.ones(1, 1, 11, 1, 1))  # the weights of every frame sum to 1
    x = torch.zeros(1, 1, 11, 1, 1)  # the upsampler's windowed denoiser blends through the same crossfade
    assert torch.allclose(windowed(lambda sample, t: sample + t, 4, 2)(x, torch.tensor(1.0)), torch.ones_like(x))
    with pytest.raises(ValueError, match="overlap"):
        window_starts(8, 4, 4)

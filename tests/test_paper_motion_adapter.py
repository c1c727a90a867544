"""AnimateDiff interchange: the attention-only variant exports exactly to diffusers' MotionAdapter."""

from __future__ import annotations

import pytest
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
from paper_helpers import tiny_unet

from vldm.config.core import ConfigError
from vldm.models.motion_adapter import export_motion_adapter, import_motion_adapter, to_unet_motion_model
from vldm.models.video_unet import VideoLDMUNet
from vldm.sample.tiny import perturb


@pytest.fixture(scope="module")
def model():
    m = VideoLDMUNet.from_unet2d(
        tiny_unet(), temporal_block="animatediff", res_blocks=False, motion_num_attention_heads=4, merge_init=0.7
    ).eval()
    perturb(m.temporal, scale=0.1)  # far from the identity
    return m


def _inputs(f: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, f, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 3, 32, generator=g)


@torch.no_grad()
def test_exported_adapter_through_unet_motion_model_matches(model):
    x, t, ctx = _inputs()
    ours = model(x, t, ctx)
    assert (ours - model(x, t, ctx, image_only=True)).abs().max() > 1e-2  # the temporal layers matter
    theirs = to_unet_motion_model(model)(
        x, t, ctx.repeat_interleave(x.shape[2], 0)
    ).sample  # diffusers wants text per frame
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def test_adapter_round_trips_through_save_pretrained_and_import(model, tmp_path):
    export_motion_adapter(model).save_pretrained(str(tmp_path / "adapter"))
    adapter = MotionAdapter.from_pretrained(str(tmp_path / "adapter"))
    fresh = VideoLDMUNet.from_unet2d(
        model.unet, temporal_block="animatediff", res_blocks=False, motion_num_attention_heads=4
    ).eval()
    import_motion_adapter(fresh, adapter)  # AnimateDiff weights as the initialisation of our model
    x, t, ctx = _inputs()
    assert (fresh(x, t, ctx) - model(x, t, ctx)).abs().max().item() <= 1e-4


@torch.no_grad()
def test_animatediff_pipeline_runs_with_the_exported_adapter(model, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vldm.models.base import SD_SCHEDULER, build_tiny_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path / "tok")))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length,
        )
    ).eval()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).eval()
    pipe = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=model.unet,
        motion_adapter=export_motion_adapter(model),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
    )
    out = pipe(
        "a red square", num_frames=4, height=8, width=8, num_inference_steps=2, guidance_scale=1.0, output_type="latent"
    ).frames
    assert out.shape[:3] == (1, 4, 4) and torch.isfinite(out).all()


def test_the_papers_full_design_cannot_be_exported_exactly():
    m = VideoLDMUNet.from_unet2d(tiny_unet())
    with pytest.raises(ValueError, match="animatediff"):
        export_motion_adapter(m)
    with pytest.raises(ConfigError, match="res_blocks"):
        from vldm.config import TemporalOptions, from_dict

        from_dict(TemporalOptions, {"temporal_block": "animatediff"})


@torch.no_grad()
def test_motion_modules_start_as_identity_and_skip_in_image_mode():
    m = VideoLDMUNet.from_unet2d(
        tiny_unet(), temporal_block="animatediff", res_blocks=False, motion_num_attention_heads=4
    ).eval()
    x, t, ctx = _inputs(4)
    assert (m(x, t, ctx) - m(x, t, ctx, image_only=True)).abs().max().item() < 1e-5

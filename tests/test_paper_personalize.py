"""Personalised text-to-video: trained temporal layers onto a fine-tuned image UNet, LoRA fused, two text encoders."""

from __future__ import annotations

import pytest
import torch
from paper_helpers import tiny_unet

from vldm.models.personalize import fuse_lora, personalize
from vldm.models.video_unet import VideoLDMUNet
from vldm.sample.tiny import perturb


@pytest.fixture()
def trained():
    m = VideoLDMUNet.from_unet2d(tiny_unet()).eval()
    perturb(m.temporal, scale=0.05)
    return m


def _finetuned(seed: int = 1):
    u = tiny_unet()
    perturb(u, scale=0.01, seed=seed)  # a "DreamBooth" fine-tune: same shape, other weights
    return u


def test_temporal_layers_move_onto_a_finetuned_unet(trained, tmp_path):
    tuned = _finetuned()
    trained.save_temporal(tmp_path / "t")
    for source in (trained, tmp_path / "t"):
        video = personalize(source, tuned)
        assert video.unet is tuned
        assert all(
            torch.equal(a, b)
            for a, b in zip(video.temporal.state_dict().values(), trained.temporal.state_dict().values())
        )
    with pytest.raises(ValueError, match="different UNet shape"):
        personalize(tmp_path / "t", tiny_unet(block_out_channels=(16, 32)))


def test_lora_formats_fuse_to_the_same_weights():
    rank, name = 2, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(rank, 32, generator=g), torch.randn(32, rank, generator=g)
    expected = tiny_unet().get_submodule(name).weight + 0.5 * (4.0 / rank) * up @ down
    formats = [
        {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up},  # diffusers / PEFT (alpha = rank)
        {
            f"lora_unet_{name.replace('.', '_')}.lora_down.weight": down,  # kohya, with alpha
            f"lora_unet_{name.replace('.', '_')}.lora_up.weight": up,
            f"lora_unet_{name.replace('.', '_')}.alpha": torch.tensor(4.0),
        },
    ]
    for i, sd in enumerate(formats):
        u = tiny_unet()
        assert fuse_lora(u, sd, scale=0.5 if i else 0.5 * 4.0 / rank) == [name]
        assert torch.allclose(u.get_submodule(name).weight, expected, atol=1e-6)


@torch.no_grad()
def test_temporal_layers_read_the_original_text_encoder(trained):
    video = personalize(trained, _finetuned())
    x, t = torch.randn(1, 4, 3, 4, 4), torch.tensor([500])
    tuned_text, original_text = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    both = video(x, t, tuned_text, temporal_encoder_hidden_states=original_text)
    assert not torch.allclose(both, video(x, t, tuned_text))  # the temporal cross-attention sees the other text
    assert torch.allclose(
        video(x, t, tuned_text, image_only=True),
        video(x, t, tuned_text, temporal_encoder_hidden_states=original_text, image_only=True),
    )

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


def test_peft_adapter_directory_fuses_with_its_lora_alpha(tmp_path):
    """A LoRA in the layout PeftModel.save_pretrained writes (peft is not installed here): adapter_config.json
    with lora_alpha != r and an alpha_pattern, weights keyed base_model.model.<module>.lora_A/B.weight."""
    import json

    from safetensors.torch import save_file

    rank, q, k = 4, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"
    g = torch.Generator().manual_seed(0)
    w = {m: tiny_unet().get_submodule(m).weight for m in (q, k)}
    ab = {m: (torch.randn(rank, w[m].shape[1], generator=g), torch.randn(w[m].shape[0], rank, generator=g)) for m in w}
    sd = {f"base_model.model.{m}.lora_{n}.weight": t for m, pair in ab.items() for n, t in zip("AB", pair)}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 16,
        "alpha_pattern": {"mid_block.attentions.0.proj_in": 2},
        "rank_pattern": {},
        "target_modules": ["to_q", "proj_in"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "task_type": None,
        "inference_mode": True,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    alphas = {q: 16.0, k: 2.0}
    for source in (tmp_path, tmp_path / "adapter_model.safetensors"):  # the directory or its weights file
        u = tiny_unet()
        assert sorted(fuse_lora(u, source, scale=0.5)) == sorted([q, k])
        for m, (a, b) in ab.items():
            expected = w[m] + 0.5 * alphas[m] / rank * (b @ a).reshape(w[m].shape)
            assert torch.allclose(u.get_submodule(m).weight, expected, atol=1e-5), m
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        fuse_lora(tiny_unet(), tmp_path)

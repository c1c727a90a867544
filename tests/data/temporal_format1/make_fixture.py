"""Writes this fixture with the format-1 code (vldm at commit b112038, before the VideoLDMUNet redesign).

Kept for provenance only: it cannot run against the current code (that is the point of the fixture).
    PYTHONPATH=<checkout of b112038> python tests/data/temporal_format1/make_fixture.py
"""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from vldm.models import VideoLDMUNet
from vldm.models.temporal import MergeFactor

HERE = Path(__file__).parent
UNET = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
    sample_size=8,
)
OPTIONS = dict(
    ff_mult=1,
    extra_in_channels=2,
    num_class_labels=3,
    scalar_conds=("fps",),
    temporal_cond_channels=3,
    # runtime options a GPU run would have saved in format 1: must not be re-applied on load
    attention_backend="math",
    gradient_checkpointing="temporal",
    attn_max_batch=1024,
)

if __name__ == "__main__":
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    model = VideoLDMUNet.from_unet2d(unet, **OPTIONS).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.temporal.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, MergeFactor):
                m.mix_factor.fill_(-1.0)
    g = torch.Generator().manual_seed(2)
    io = dict(
        sample=torch.randn(1, 6, 3, 8, 8, generator=g),
        timestep=torch.tensor([300]),
        text=torch.randn(1, 5, 8, generator=g),
        class_labels=torch.tensor([1]),
        fps=torch.tensor([8.0]),
        temporal_cond=torch.randn(1, 3, 3, 8, 8, generator=g),
    )
    with torch.no_grad():
        io["expected"] = model(
            io["sample"],
            io["timestep"],
            io["text"],
            class_labels=io["class_labels"],
            conditions={"fps": io["fps"]},
            temporal_cond=io["temporal_cond"],
        )
    model.save_temporal(HERE)
    save_file({k: v.contiguous() for k, v in io.items()}, str(HERE / "io.safetensors"))
    print({k: tuple(v.shape) for k, v in io.items()}, sum(p.numel() for p in model.temporal.parameters()))

"""GPU paths at SD-1.5 scale: bf16, the SDPA/flash kernels, chunked temporal attention, checkpointing.

Skipped without CUDA; written to run as they are on a GPU node (`pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from vldm.models import VideoLDMUNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def sd15_video_unet(**opts) -> VideoLDMUNet:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD-1.5 shape, random weights
    return VideoLDMUNet.from_unet2d(unet, **opts).to("cuda", torch.bfloat16)


def test_identity_at_init_in_bf16():
    model = sd15_video_unet().eval()
    x = torch.randn(1, 4, 8, 40, 64, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        video = model(x, 500, ctx)
        image = model(x, 500, ctx, image_only=True)
    # zero-initialised temporal branches: equal up to bf16 rounding of the merge
    assert (video.float() - image.float()).abs().max() < 2e-2


@pytest.mark.parametrize("mode", ["off", "temporal", "block"])
def test_train_step_sd15_scale(mode):
    """16 frames of 40x64 latents (320x512 px), micro-batch 1: the paper's WebVid shape."""
    model = sd15_video_unet(gradient_checkpointing=mode).train()
    x = torch.randn(1, 4, 16, 40, 64, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    model(x, 500, ctx).float().square().mean().backward()
    grads = [p.grad for p in model.temporal_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.unet.parameters())
    print(f"checkpointing={mode}: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def test_high_resolution_temporal_attention_is_chunked():
    """b*h*w*heads far above 65,535 (pytorch issue 142228) must not crash the SDPA kernels."""
    model = sd15_video_unet(res_blocks=False).eval()
    x = torch.randn(1, 4, 8, 128, 128, device="cuda", dtype=torch.bfloat16)  # 1024x1024 px
    ctx = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, 10, ctx)
    assert torch.isfinite(out).all()

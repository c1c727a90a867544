"""A tiny untrained cascade (every stage of the paper) for tests and benchmarks: random weights, CPU-sized.

Temporal layers are perturbed away from their identity initialisation (`perturb`), so the stages
really mix frames and conditions, as trained ones would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from vldm.config.core import to_dict
from vldm.config.model import TemporalOptions
from vldm.models.base import SD_SCHEDULER, ModelConfig, build_tiny_base, load_components
from vldm.models.temporal_decoder import VideoDecoder
from vldm.models.upsampler import build_tiny_upscaler
from vldm.models.video_unet import VideoLDMUNet
from vldm.sample.api import Cascade
from vldm.sample.stages import StageModel
from vldm.tasks import get_task


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def stage_model(
    unet2d: UNet2DConditionModel,
    task: str,
    task_options: dict | None = None,
    clip_frames: int = 8,
    size: int = 32,
    seed: int = 0,
    temporal: dict | None = None,
) -> StageModel:
    """A VideoLDMUNet on `unet2d` built as the trainer builds it for `task` (task options merged)."""
    t = get_task(task, **(task_options or {}))
    opts = to_dict(TemporalOptions(**(temporal or {})))
    for k, v in t.required_temporal_options().items():
        opts[k] = list(dict.fromkeys(list(opts.get(k) or []) + list(v))) if isinstance(v, tuple) else v
    model = VideoLDMUNet.from_unet2d(unet2d, **opts).eval()
    perturb(torch.nn.ModuleList([model.temporal, model.conditioning]), seed=seed)
    return StageModel(
        model=model,
        task=task,
        task_options=dict(task_options or {}),
        clip_frames=clip_frames,
        size=size,
        scheduler_config=dict(SD_SCHEDULER),
        source="tiny",
    )


def build_tiny_cascade(
    root: str | Path,
    stages: tuple[str, ...] = ("predict", "interpolate", "decoder", "upsample"),
    clip_frames: int = 8,
    size: int = 32,
    seed: int = 0,
) -> Cascade:
    """Key frames (generate) + the requested stages on one tiny base model written under `root`."""
    root = Path(root)
    base = root / "base"
    if not (base / "unet").is_dir():
        build_tiny_base(base, seed=seed)
    comps = load_components(ModelConfig(pretrained=str(base)))
    unet = comps.unet2d
    key = stage_model(unet, "generate", clip_frames=clip_frames, size=size, seed=seed)
    pred = (
        stage_model(unet, "predict", clip_frames=clip_frames, size=size, seed=seed + 1) if "predict" in stages else None
    )
    interp = None
    if "interpolate" in stages:
        interp = stage_model(
            unet, "interpolate", {"window": 5, "stages": [0, 1]}, clip_frames=4 * (5 - 1) + 1, size=size, seed=seed + 2
        )
    dec = None
    if "decoder" in stages:
        dec = VideoDecoder.from_vae(comps.vae).eval()
        perturb(torch.nn.ModuleList([dec.temporal]), scale=0.01, seed=seed + 3)
    up = up_vae = None
    if "upsample" in stages:
        up_dir = root / "upscaler"
        if not (up_dir / "unet").is_dir():
            build_tiny_upscaler(up_dir, base)
        up_unet = UNet2DConditionModel.from_pretrained(str(up_dir / "unet")).eval().requires_grad_(False)
        up = stage_model(up_unet, "upsample", {"patch_size": 4}, clip_frames=clip_frames, size=size * 4, seed=seed + 4)
        up_vae = AutoencoderKL.from_pretrained(str(up_dir / "vae")).eval().requires_grad_(False)
    from vldm.tasks.paper import low_res_scheduler

    return Cascade(
        key,
        comps,
        pred,
        interp,
        dec,
        up,
        up_vae,
        comps if up is not None else None,
        low_res_scheduler() if up is not None else None,
    )

"""Cascade stages from training run directories (the layout of `vldm.checkpoint`).

A run (or one of its checkpoints) gives a `StageModel`: the model through
`vldm.checkpoint.load_checkpoint_model` (raw or EMA weights), its task and task options, and its clip
length and size from the resolved config. Decoder runs (stage=decoder) give a `VideoDecoder`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vldm.checkpoint import COMPLETE, RUN_CONFIG, latest_checkpoint, load_checkpoint_model
from vldm.config.core import load_yaml
from vldm.diffusion.schedule import scheduler_config
from vldm.models.base import Components
from vldm.models.temporal_decoder import DECODER_DIR, VideoDecoder
from vldm.models.video_unet import VideoLDMUNet
from vldm.sample.stages import StageModel


def checkpoint_dir(run_or_checkpoint: str | Path) -> Path:
    """A complete checkpoint: the directory itself, or the newest complete one of a run."""
    p = Path(run_or_checkpoint)
    if (p / COMPLETE).exists():
        return p
    ck = latest_checkpoint(p)
    if ck is None:
        raise FileNotFoundError(f"{p}: not a checkpoint and no complete checkpoint under {p}/checkpoints")
    return ck


def run_stage(run_or_checkpoint: str | Path) -> str:
    """The `stage` a checkpoint was trained with (image | temporal | decoder)."""
    return str(load_yaml(checkpoint_dir(run_or_checkpoint) / RUN_CONFIG).get("stage", "temporal"))


def _base_key(cfg_tree: dict) -> str:
    model = cfg_tree.get("model", {})
    return model.get("pretrained") or json.dumps(model.get("unet", {}), sort_keys=True)


def load_stage(
    run_or_checkpoint: str | Path,
    ema: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shared: dict[str, Components] | None = None,
) -> tuple[StageModel, Components]:
    """A diffusion stage and its base model's components (VAE, text encoder) from a run or checkpoint.

    An image-stage run becomes a VideoLDMUNet whose temporal layers are the identity (the image model).
    `shared` maps base models to loaded components: stages on the same base model (key frames,
    prediction, interpolation on SD) then share one frozen image UNet, VAE and text encoder.
    """
    ck = checkpoint_dir(run_or_checkpoint)
    tree = load_yaml(ck / RUN_CONFIG)
    key = _base_key(tree)
    reuse = shared.get(key) if shared is not None and tree.get("stage", "temporal") == "temporal" else None
    cfg, comps, model = load_checkpoint_model(ck, ema=ema, components=reuse)
    if shared is not None and tree.get("stage", "temporal") == "temporal":
        shared.setdefault(key, comps)
    if not isinstance(model, VideoLDMUNet):
        model = VideoLDMUNet.from_unet2d(model)
    model = model.to(device).eval()
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    for m in (comps.vae, comps.text_encoder):
        if m is not None:
            m.to(device)
    stage = StageModel(
        model=model,
        task=cfg.task,
        task_options=dict(getattr(cfg, "task_options", {}) or {}),
        clip_frames=cfg.data.num_frames,
        size=cfg.data.size,
        width=getattr(cfg.data, "width", 0),
        scheduler_config=scheduler_config(cfg.diffusion, comps.scheduler_config),
        source=str(ck),
    )
    return stage, comps


def load_decoder(
    run_or_checkpoint: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> VideoDecoder:
    """The fine-tuned video decoder of a stage=decoder run (newest checkpoint) or of one checkpoint."""
    ck = checkpoint_dir(run_or_checkpoint)
    if not (ck / DECODER_DIR).is_dir():
        raise FileNotFoundError(f"{ck} has no {DECODER_DIR}/ (not a stage=decoder checkpoint)")
    model = VideoDecoder.from_pretrained(str(ck / DECODER_DIR)).to(device).eval()
    return model if dtype == torch.float32 else model.to(dtype=dtype)

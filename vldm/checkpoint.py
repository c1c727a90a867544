"""Run directory layout, shared by the trainer (writer), the eval pool and sampling (readers).

RUN/
  config.yaml                      resolved config of the run (enough to rebuild the model)
  checkpoints/
    step_00000100/                 one complete checkpoint (written as .tmp-step_..., then renamed)
      COMPLETE                     written last: readers ignore directories without it
      config.yaml                  resolved config at save time
      temporal.safetensors         trainable weights (stage=temporal), VideoLDMUNet.save_temporal format
      temporal_config.json
      temporal_ema.safetensors     EMA of the same weights (same keys)
      unet/                        the whole image UNet (stage=image), diffusers save_pretrained
      unet_ema/
      trainer_state.json           step, loader position, RNG, LR schedule, ...
      deepspeed/                   ZeRO optimizer/engine state without frozen parameters
  eval/<suite_hash>/step_<N>/result.json
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step_(\d+)$")
TEMPORAL_WEIGHTS = "temporal.safetensors"
TEMPORAL_EMA_WEIGHTS = "temporal_ema.safetensors"
UNET_DIR = "unet"
UNET_EMA_DIR = "unet_ema"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "config.yaml"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    m = STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
    return int(m.group(1))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Partial (.tmp*) or unmarked directories are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / COMPLETE).exists()]
    return sorted(out, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ck = complete_checkpoints(run_dir)
    return ck[-1] if ck else None


def load_checkpoint_model(
    ckpt_dir: str | Path, ema: bool = False, overrides: list[str] | tuple[str, ...] = (), components=None
):
    """(config, components, model) from a complete checkpoint: the base model from the config's local
    path, then the checkpoint's trainable weights (raw or EMA). Works for both stages.
    `components`: already loaded base-model components to reuse (stage=temporal; shared, not copied)."""

    from vldm.config import Config, build_config
    from vldm.models.base import build_video_unet, load_components

    ck = Path(ckpt_dir)
    if not (ck / COMPLETE).exists():
        raise FileNotFoundError(f"{ck} is not a complete checkpoint (no {COMPLETE} marker)")
    cfg = build_config(Config, [str(ck / RUN_CONFIG)], overrides)
    if cfg.stage == "image" or components is None:
        comps = load_components(cfg.model)
    else:
        comps = components
    if cfg.stage == "image":
        from diffusers import UNet2DConditionModel

        sub = UNET_EMA_DIR if ema and (ck / UNET_EMA_DIR).exists() else UNET_DIR
        comps.unet2d = UNet2DConditionModel.from_pretrained(str(ck / sub)).eval().requires_grad_(False)
        return cfg, comps, comps.unet2d
    model = build_video_unet(cfg.model, comps)
    weights = ck / (TEMPORAL_EMA_WEIGHTS if ema else TEMPORAL_WEIGHTS)
    if not weights.exists():
        raise FileNotFoundError(f"{weights} missing")
    model.load_temporal(weights)
    model.eval()
    return cfg, comps, model

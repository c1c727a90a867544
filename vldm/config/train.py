"""Training sections: diffusion objective, optimiser, loop, checkpoints, DeepSpeed, W&B."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import field_


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = field_(1000, "diffusion steps of the noise schedule")
    beta_schedule: str = field_("scaled_linear", "diffusers beta schedule (scaled_linear is SD's)")
    beta_start: float = field_(0.00085, "first beta")
    beta_end: float = field_(0.012, "last beta")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = field_("auto", "what the UNet predicts; auto = the base model's scheduler config (epsilon if none)")
    loss_weighting: Literal["none", "min_snr"] = field_("none", "per-timestep loss weighting")
    scheduler_from_model: bool = field_(True, "read the schedule from <model.pretrained>/scheduler when it exists")
    text_dropout: float = field_(0.1, "probability of an empty caption (classifier-free guidance)")


@dataclass
class OptimConfig:
    lr: float = field_(1e-4, "peak learning rate")
    weight_decay: float = field_(0.0, "AdamW weight decay")
    betas: tuple[float, float] = field_((0.9, 0.999), "AdamW betas")
    warmup_steps: int = field_(0, "linear warm-up steps")
    schedule: Literal["constant", "cosine"] = field_("constant", "LR schedule after warm-up")
    grad_clip: float = field_(1.0, "gradient norm clip (0 = off)")


@dataclass
class TrainConfig:
    max_steps: int = field_(20, "optimizer steps to train")
    grad_accum: int = field_(1, "micro-steps per optimizer step")
    ema_decay: float = field_(0.999, "EMA decay of trainable parameters (0 = no EMA)")
    log_every: int = field_(1, "log metrics every n steps")

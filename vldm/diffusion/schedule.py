"""Noise schedules: the base model's own (from its scheduler/ config) unless the config says otherwise."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from vldm.config.core import ConfigError
from vldm.config.train import DiffusionConfig

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}


def scheduler_config(cfg: DiffusionConfig, model_scheduler_config: dict | None) -> dict:
    """The schedule used for training and sampling: the image model's (same schedule and parameterisation
    as the image LDM, paper §3.1), or the config's when there is none or `scheduler_from_model` is off."""
    if cfg.scheduler_from_model and model_scheduler_config:
        out = dict(model_scheduler_config)
    else:
        out = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    if cfg.prediction_type != "auto":
        out["prediction_type"] = cfg.prediction_type
    out.setdefault("prediction_type", "epsilon")
    return out


def check_parameterisation(cfg: DiffusionConfig, image_scheduler_config: dict | None, image_unet_trained: bool) -> None:
    """Refuse a `diffusion.prediction_type` that differs from what the frozen image UNet predicts.

    The temporal stage keeps the image UNet's spatial layers frozen: they were trained to predict one
    quantity (epsilon for SD 1.x, v for SD 2.x), and a loss on another silently trains the temporal
    layers against it. Only a run that trains the image UNet itself (stage=image) may change it.
    `image_scheduler_config` is the image model's scheduler/ config (None: the model has none, nothing to
    compare with)."""
    if image_unet_trained or cfg.prediction_type == "auto" or image_scheduler_config is None:
        return
    own = image_scheduler_config.get("prediction_type", "epsilon")
    if cfg.prediction_type != own:
        raise ConfigError(
            f"diffusion.prediction_type: {cfg.prediction_type!r} differs from the frozen image UNet's {own!r} "
            "(its scheduler config): the image UNet would be used with a parameterisation it was not trained "
            f"for. Use 'auto' (or {own!r}), or train the image UNet (stage=image)"
        )


def make_scheduler(config: dict, kind: str = "ddpm"):
    """A diffusers scheduler of `kind` (ddpm for training noise, ddim/dpm for sampling) from one config."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind].from_config(config)

"""Noise schedules: the base model's own (from its scheduler/ config) unless the config says otherwise."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

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


def make_scheduler(config: dict, kind: str = "ddpm"):
    """A diffusers scheduler of `kind` (ddpm for training noise, ddim/dpm for sampling) from one config."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind].from_config(config)

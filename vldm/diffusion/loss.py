"""The training objective: same noise schedule and parameterisation as the image model (paper §3.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def diffusion_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    generator: torch.Generator | None = None,
    weighting: str = "none",
    snr_gamma: float = 5.0,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """MSE between the model output and the target (eps or v) at random timesteps.

    model_fn(noisy_latents, timesteps) -> prediction with the shape of `latents` (b c f h w or b c h w).
    weighting: "none" or "min_snr" (Hang et al. 2023, gamma `snr_gamma`).
    """
    b = latents.shape[0]
    dev = latents.device
    if noise is None:
        noise = torch.randn(
            latents.shape,
            generator=generator,
            device="cpu" if generator is not None and generator.device.type == "cpu" else dev,
            dtype=torch.float32,
        )
        noise = noise.to(dev, latents.dtype)
    if timesteps is None:
        n = scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0,
            n,
            (b,),
            generator=generator,
            device="cpu" if generator is not None and generator.device.type == "cpu" else dev,
        )
    timesteps = timesteps.to(dev).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        target = noise
    elif pred_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {pred_type!r}")
    pred = model_fn(noisy, timesteps)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weighting == "min_snr":
        s = snr(scheduler.alphas_cumprod, timesteps)
        w = torch.clamp(s, max=snr_gamma) / (s + 1 if pred_type == "v_prediction" else s)
        per_sample = per_sample * w
    elif weighting != "none":
        raise ValueError(f"unknown loss weighting {weighting!r}")
    return per_sample.mean() if reduce else per_sample

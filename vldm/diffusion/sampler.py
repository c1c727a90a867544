"""Sampling latents with diffusers schedulers (DDIM, as in the paper; DPM-Solver) and classifier-free guidance.

Sample i's initial noise comes from its own seed, so results do not depend on batch composition or on
which worker draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange

from vldm.diffusion.schedule import make_scheduler


def initial_noise(shape: tuple[int, ...], seeds: list[int], device, dtype=torch.float32) -> torch.Tensor:
    """(len(seeds), *shape) noise; row i depends only on seeds[i] (drawn on the CPU for portability)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.ndim > 0:
        return torch.cat([a, b], 0)
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return a


@torch.no_grad()
def sample_latents(
    model: Callable[..., torch.Tensor],
    encoder_hidden_states: torch.Tensor,
    num_frames: int,
    height: int,
    width: int,
    seeds: list[int],
    scheduler_config: dict,
    steps: int = 25,
    guidance_scale: float = 1.0,
    negative_hidden_states: torch.Tensor | None = None,
    sampler: str = "ddim",
    latent_channels: int | None = None,
    model_kwargs: dict | None = None,
    uncond_model_kwargs: dict | None = None,
    latents: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor], Any] | None = None,
    step_hook: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate (b, c, f, h, w) latents with `model(sample, t, encoder_hidden_states, **model_kwargs)`.

    guidance_scale > 1 runs the conditional and unconditional branch in one batch:
    eps = eps_u + s * (eps_c - eps_u). `negative_hidden_states` defaults to zeros-like text (an empty
    prompt should be encoded and passed for text models). `model_kwargs` / `uncond_model_kwargs` are
    the per-branch extra inputs (class labels, context frames ...). `step_hook(latents, t)` may edit the
    latents after each step (e.g. to re-impose known frames).
    """
    dev = encoder_hidden_states.device
    dtype = encoder_hidden_states.dtype
    b = encoder_hidden_states.shape[0]
    if len(seeds) != b:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for {b} samples")
    c = latent_channels or getattr(getattr(model, "unet", None), "config", None).in_channels
    sched = make_scheduler(scheduler_config, sampler)
    sched.set_timesteps(steps, device=dev)
    if latents is None:
        latents = initial_noise((c, num_frames, height, width), seeds, dev, dtype) * sched.init_noise_sigma
    kw = dict(model_kwargs or {})
    guided = guidance_scale != 1.0
    if guided:
        neg = negative_hidden_states if negative_hidden_states is not None else torch.zeros_like(encoder_hidden_states)
        ctx = torch.cat([neg, encoder_hidden_states], 0)
        kw = _cat(dict(uncond_model_kwargs if uncond_model_kwargs is not None else kw), kw)
    else:
        ctx = encoder_hidden_states
    for i, t in enumerate(sched.timesteps):
        inp = torch.cat([latents, latents], 0) if guided else latents
        inp = sched.scale_model_input(inp, t)
        out = model(inp, t.expand(inp.shape[0]) if t.ndim == 0 else t, ctx, **kw)
        if guided:
            u, cnd = out.chunk(2)
            out = u + guidance_scale * (cnd - u)
        latents = sched.step(out, t, latents).prev_sample
        if step_hook is not None:
            latents = step_hook(latents, t)
        if callback is not None:
            callback(i, len(sched.timesteps), latents)
    return latents


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(b, c, f, h, w) latents -> (b, 3, f, H, W) pixels in [-1, 1], decoding frames in chunks."""
    if vae is None:
        return latents.clamp(-1, 1)
    b, _, f = latents.shape[:3]
    flat = rearrange(latents, "b c f h w -> (b f) c h w") / vae.config.scaling_factor
    outs = [vae.decode(flat[i : i + chunk].to(vae.dtype)).sample for i in range(0, flat.shape[0], chunk)]
    return rearrange(torch.cat(outs), "(b f) c h w -> b c f h w", b=b, f=f).clamp(-1, 1).float().contiguous()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, chunk: int = 16, sample: bool = False, generator=None) -> torch.Tensor:
    """(b, 3, f, H, W) pixels in [-1, 1] -> scaled (b, c, f, h, w) latents (frame by frame: the encoder is an
    image model)."""
    b, _, f = pixels.shape[:3]
    flat = rearrange(pixels, "b c f h w -> (b f) c h w").to(vae.dtype)
    outs = []
    for i in range(0, flat.shape[0], chunk):
        dist = vae.encode(flat[i : i + chunk]).latent_dist
        outs.append(dist.sample(generator) if sample else dist.mean)
    lat = torch.cat(outs).float() * vae.config.scaling_factor
    # contiguous: the VAE returns channels-last strides, which crash the UNet's backward on CPU
    return rearrange(lat, "(b f) c h w -> b c f h w", b=b, f=f).contiguous()

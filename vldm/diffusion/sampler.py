"""The one denoising loop of vldm: the eval pool, the sampler CLI / pipeline (every cascade stage) and the
demo all sample through `denoise`, with diffusers schedulers (DDIM, as in the paper; DPM-Solver).

Sample i's noise comes from its own seed (`initial_noise`, `subseed`), so results do not depend on batch
composition, chunk scheduling or which worker draws them.

Guidance (classifier-free, Ho & Salimans) is composed over two conditions, each with its own scale:
the text/class condition and the context condition of prediction models (paper §3.2:
f' = f(z) + s (f(z; c_S) - f(z))). With A = f(z; text, context), B = f(z; text) and C = f(z; context):

    eps = A + (s_text - 1) (A - C) + (s_ctx - 1) (A - B)

which is plain text guidance C + s_text (A - C) when s_ctx = 1, and the paper's context guidance
B + s_ctx (A - B) when s_text = 1 (computed in that form then). Only the branches a scale needs are
evaluated, in one batch.

Known frames (the context of a prediction, the key frames of an interpolation) are re-imposed before
every model call, noised to the current level with a fixed noise: the model then sees at those positions
exactly what it saw in training, and the output holds the given latents there bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from vldm.diffusion.schedule import make_scheduler
from vldm.models.windows import crossfade


def initial_noise(shape: tuple[int, ...], seeds: list[int], device, dtype=torch.float32) -> torch.Tensor:
    """(len(seeds), *shape) noise; row i depends only on seeds[i] (drawn on the CPU for portability)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def subseed(seed: int, *tags: Any) -> int:
    """A seed for one part of a sample (a rollout chunk, an interpolation window) that depends only on
    the sample's seed and the tags: results do not depend on batch composition or chunk scheduling."""
    h = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(h[:7], "little")


def latent_channels(model: Any) -> int:
    """Channels of the latents a denoiser produces: its UNet's out_channels. Not in_channels: an upscaler's
    input also holds the low-res frames (SD x4: 4 latent + 3 image channels in, 4 out)."""
    unet = getattr(model, "unet", model)
    return int(unet.config.out_channels)


ModelFn = Callable[..., torch.Tensor]  # model(sample, t, encoder_hidden_states=..., **kwargs) -> (b, c, f, h, w)


@dataclass
class Conditioning:
    """Model kwargs of the conditional branch and of the two 'unconditional' ones.

    `cond` must hold `encoder_hidden_states`; `no_text` is `cond` with the negative prompt / no-label
    class (None: no text guidance possible); `no_context` is `cond` with an empty context (S = 0)."""

    cond: dict[str, Any]
    no_text: dict[str, Any] | None = None
    no_context: dict[str, Any] | None = None
    text_scale: float = 1.0
    context_scale: float = 1.0

    def branches(self) -> list[tuple[str, dict[str, Any]]]:
        out = [("A", self.cond)]
        if self.text_scale != 1.0:
            if self.no_text is None:
                raise ValueError("text guidance needs the unconditional (negative prompt) inputs")
            out.append(("C", self.no_text))
        if self.context_scale != 1.0 and self.no_context is not None:
            out.append(("B", self.no_context))
        return out

    def combine(self, outs: dict[str, torch.Tensor]) -> torch.Tensor:
        a = outs["A"]
        if "C" in outs and "B" in outs:
            return a + (self.text_scale - 1.0) * (a - outs["C"]) + (self.context_scale - 1.0) * (a - outs["B"])
        # one condition guided: the textbook u + s (c - u), the same value computed the same way
        if "C" in outs:
            return outs["C"] + self.text_scale * (a - outs["C"])
        if "B" in outs:
            return outs["B"] + self.context_scale * (a - outs["B"])
        return a


@dataclass
class Known:
    """Frames whose clean latents are given: `mask` (b, f) bool, `latents` (b, c, f, h, w)."""

    latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor | None = field(default=None, repr=False)

    def where(self) -> torch.Tensor:
        return self.mask[:, None, :, None, None]


def _cat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(values, 0)
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values]) for k in first}
    return first


def _repeat_extra(extra: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if extra is None else torch.cat([extra] * n, 0)


@torch.no_grad()
def denoise(
    model: ModelFn,
    shape: tuple[int, ...],
    seeds: list[int],
    scheduler_config: dict,
    conditioning: Conditioning,
    steps: int = 25,
    sampler: str = "ddim",
    known: Known | None = None,
    extra_channels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_step: Callable[[], Any] | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Sample (b, *shape) latents; sample i starts from noise seeded by seeds[i].

    extra_channels (b, e, f, h, w) are concatenated after the noisy latents at every call (low-res
    frames of the upsampler). `on_step()` is called after each step (progress bars).

    `dtype` is the model's: its inputs are cast to it. The sampling state (the latents, the guidance
    combination, the scheduler's update) stays in float32 whatever the model runs in: at 25-50 steps
    the bf16 rounding of x_t at every step would otherwise accumulate (bf16 keeps 8 bits of mantissa).
    The initial noise is float32 too: a seed gives the same start in any precision.
    """
    text = conditioning.cond.get("encoder_hidden_states")
    if text is not None and text.shape[0] != len(seeds):
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for {text.shape[0]} samples")
    sched = make_scheduler(scheduler_config, sampler)
    sched.set_timesteps(steps, device=device)
    state = torch.float32
    x = initial_noise(tuple(shape), seeds, device, state) * sched.init_noise_sigma
    if known is not None:
        if known.noise is None:
            known.noise = initial_noise(tuple(shape), [subseed(s, "known") for s in seeds], device, state)
        known.noise = known.noise.to(state)
        keep = known.where()
    branches = conditioning.branches()
    names = [n for n, _ in branches]
    kw = _cat([b for _, b in branches])
    extra = _repeat_extra(extra_channels, len(branches))
    step_kw = {"eta": eta} if sampler == "ddim" else {}
    for t in sched.timesteps:
        if known is not None:
            noisy_known = sched.add_noise(known.latents.to(state), known.noise, t.reshape(1).expand(x.shape[0]))
            x = torch.where(keep, noisy_known, x)
        inp = sched.scale_model_input(torch.cat([x] * len(branches), 0), t).to(dtype)
        if extra is not None:
            inp = torch.cat([inp, extra.to(dtype)], 1)
        out = model(inp, t.reshape(1).expand(inp.shape[0]), **kw).float()
        eps = conditioning.combine(dict(zip(names, out.chunk(len(branches)))))
        x = sched.step(eps, t, x, **step_kw).prev_sample
        if on_step is not None:
            on_step()
    if known is not None:
        x = torch.where(keep, known.latents.to(x.dtype), x)
    return x.to(dtype)


def windowed(model: ModelFn, window: int, overlap: int) -> ModelFn:
    """Apply `model` over overlapping windows of frames, cross-faded (`vldm.models.windows`).

    Every per-frame input (5-D tensors: the sample, temporal_cond) is cut into the same windows; used by
    the upsampler on sequences longer than it was trained on (paper §3.4: applied in windows over frames).
    """
    if overlap >= window:
        raise ValueError("overlap must be smaller than the window")

    def run(sample: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        f = sample.shape[2]
        if f <= window:
            return model(sample, t, **kw)

        def one(s: int, e: int) -> torch.Tensor:
            sub = {k: (v[:, :, s:e] if isinstance(v, torch.Tensor) and v.ndim == 5 else v) for k, v in kw.items()}
            return model(sample[:, :, s:e], t, **sub)

        return crossfade(one, f, window, overlap, sample.device).to(sample.dtype)

    return run


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

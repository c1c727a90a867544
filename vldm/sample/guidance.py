"""The denoising loop of every cascade stage: diffusers schedulers, guidance over several conditions,
known frames re-imposed, frame windows.

Guidance (classifier-free, Ho & Salimans) is composed over two conditions, each with its own scale:
the text/class condition and the context condition of prediction models (paper §3.2:
f' = f(z) + s (f(z; c_S) - f(z))). With A = f(z; text, context), B = f(z; text) and C = f(z; context):

    eps = A + (s_text - 1) (A - C) + (s_ctx - 1) (A - B)

which is plain text guidance C + s_text (A - C) when s_ctx = 1, and the paper's context guidance
B + s_ctx (A - B) when s_text = 1. Only the branches a scale needs are evaluated, in one batch.

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

from vldm.diffusion.sampler import initial_noise
from vldm.diffusion.schedule import make_scheduler

ModelFn = Callable[..., torch.Tensor]  # model(sample, t, encoder_hidden_states, **kwargs) -> (b, c, f, h, w)


def subseed(seed: int, *tags: Any) -> int:
    """A seed for one part of a sample (a rollout chunk, an interpolation window) that depends only on
    the sample's seed and the tags: results do not depend on batch composition or chunk scheduling."""
    h = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(h[:7], "little")


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
        eps = a
        if "C" in outs:
            eps = eps + (self.text_scale - 1.0) * (a - outs["C"])
        if "B" in outs:
            eps = eps + (self.context_scale - 1.0) * (a - outs["B"])
        return eps


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
    """Apply `model` over overlapping windows of frames and blend the outputs (triangular weights).

    Every per-frame input (5-D tensors: the sample, temporal_cond) is cut into the same windows; used by
    the upsampler on sequences longer than it was trained on (paper §3.4: applied in windows over frames).
    """
    if overlap >= window:
        raise ValueError("overlap must be smaller than the window")

    def run(sample: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        f = sample.shape[2]
        if f <= window:
            return model(sample, t, **kw)
        starts = list(range(0, f - window + 1, window - overlap))
        if starts[-1] + window < f:
            starts.append(f - window)
        ramp = torch.ones(window, device=sample.device, dtype=torch.float32)
        if overlap:
            r = torch.arange(1, overlap + 1, device=sample.device, dtype=torch.float32) / (overlap + 1)
            ramp[:overlap], ramp[-overlap:] = r, r.flip(0)
        out, wsum = None, torch.zeros(f, device=sample.device)
        for s in starts:
            sl = slice(s, s + window)
            sub = {k: (v[:, :, sl] if isinstance(v, torch.Tensor) and v.ndim == 5 else v) for k, v in kw.items()}
            y = model(sample[:, :, sl], t, **sub).float()
            w = ramp.clone()
            if s == 0:
                w[:overlap] = 1.0
            if s + window == f:
                w[window - overlap :] = 1.0
            if out is None:
                out = torch.zeros(y.shape[:2] + (f,) + y.shape[3:], device=y.device)
            out[:, :, sl] += y * w[None, None, :, None, None]
            wsum[sl] += w
        return (out / wsum[None, None, :, None, None]).to(sample.dtype)

    return run

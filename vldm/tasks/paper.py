"""The paper's conditional models as training tasks: prediction (§3.2), interpolation (§3.3), upsampling (§3.4).

Each task turns a clip of clean latents into the extra forward inputs of `VideoLDMUNet` (see
`vldm.tasks.base`). The conditioning format is defined here once and used by training and by
`vldm.sample` alike:

- context condition (prediction, interpolation): `temporal_cond = cat(m * z, m)` over channels, with
  m (b, 1, f, 1, 1) the binary mask of given frames broadcast over space; fed to the temporal layers
  through the zero-initialised downsampling encoder (`temporal.temporal_cond_channels = c + 1`);
- loss: by default only the frames the model must generate count (`loss_frames=generated`): the given
  frames are replaced by their known values at sampling, so their prediction is never used, and the
  model's capacity goes to the frames that matter. `loss_frames=all` trains every frame. With S = 0 (the
  unconditional branch) every frame counts either way.

Options: each task takes keyword options validated against its dataclass in `vldm.config.tasks` (unknown keys
are errors), e.g. `get_task("predict", loss_frames="all")`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from einops import rearrange

from vldm.config.core import from_dict
from vldm.config.tasks import InterpolateOptions, PredictOptions, UpsampleOptions
from vldm.tasks import register
from vldm.tasks.base import Task, TaskInputs

# ---------------------------------------------------------------------------- shared conditioning format


def context_condition(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) latents and (b, 1, f, 1, 1) or (b, f) mask -> (b, c + 1, f, h, w) = cat(m * z, m)."""
    if mask.ndim == 2:
        mask = mask[:, None, :, None, None]
    m = mask.to(latents.dtype).expand(-1, 1, -1, latents.shape[3], latents.shape[4])
    return torch.cat([latents * m, m], dim=1)


def first_frames_mask(num_context: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b,) numbers S of given frames -> (b, f) bool: the first S frames of each clip are given (prediction's
    context)."""
    return torch.arange(num_frames, device=num_context.device)[None, :] < num_context[:, None]


def key_frame_mask(num_frames: int, factor: int = 4, device=None) -> torch.Tensor:
    """(f,) bool: key frames sit at every `factor`-th position, 0, factor, 2 factor, ... (interpolation)."""
    return torch.arange(num_frames, device=device) % factor == 0


def interpolated_length(num_key_frames: int, factor: int = 4) -> int:
    """T key frames -> factor * (T - 1) + 1 frames (paper: 8 -> 29 -> 113 with factor 4)."""
    return factor * (num_key_frames - 1) + 1


def _choice(values: tuple, probs: tuple, n: int, generator: torch.Generator | None) -> torch.Tensor:
    p = torch.tensor(probs if probs else [1.0] * len(values), dtype=torch.float)
    idx = torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)
    return torch.tensor(values)[idx]


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def _clip_scalar(batch: dict, key: str, b: int, default: float) -> torch.Tensor:
    """A per-clip float: batch[key] (tensor, list or number), else each clip's meta[key], else `default`."""
    if key in batch:
        return torch.as_tensor(batch[key], dtype=torch.float).reshape(-1).expand(b).clone()
    meta = batch.get("meta") or [{}] * b
    return torch.tensor([float(m.get(key, default)) if isinstance(m, dict) else float(default) for m in meta])


class _OptionsTask(Task):
    options_cls: type

    def __init__(self, **options: Any):
        self.opts = from_dict(self.options_cls, options, prefix=f"task_options[{self.name}]")


# ---------------------------------------------------------------------------- prediction (§3.2)


@register
class PredictTask(_OptionsTask):
    """Predict the rest of a clip from its first S frames (S ~ context_frames) through temporal_cond."""

    name = "predict"
    options_cls = PredictOptions

    def required_temporal_options(self) -> dict[str, Any]:
        return {"temporal_cond_channels": self.opts.latent_channels + 1}

    def training_inputs(self, latents: torch.Tensor, batch: dict, generator: torch.Generator | None) -> TaskInputs:
        b, c, f = latents.shape[:3]
        if c != self.opts.latent_channels:
            raise ValueError(
                f"predict task: latents have {c} channels, task_options.latent_channels is {self.opts.latent_channels}"
            )
        s = _choice(self.opts.context_frames, self.opts.context_probs, b, generator).clamp(max=f - 1)
        mask = first_frames_mask(s.to(latents.device), f)
        kwargs = {"temporal_cond": context_condition(latents, mask)}
        loss_mask = None
        if self.opts.loss_frames == "generated":
            loss_mask = (~mask).to(latents.dtype)[:, None, :, None, None]
        return TaskInputs(model_kwargs=kwargs, loss_mask=loss_mask)


# ---------------------------------------------------------------------------- interpolation (§3.3)


@register
class InterpolateTask(_OptionsTask):
    """Fill factor - 1 frames between key frames (T -> factor * (T - 1) + 1); one model, two stages
    told apart by a binary scalar condition 'stage' (the paper's two-stage 1.875 -> 7.5 -> 30 fps)."""

    name = "interpolate"
    options_cls = InterpolateOptions

    def required_temporal_options(self) -> dict[str, Any]:
        conds = ("fps", "stage") if self.opts.fps_condition else ("stage",)
        return {"temporal_cond_channels": self.opts.latent_channels + 1, "scalar_conds": conds}

    def window(self, clip_frames: int) -> int:
        """Frames per window (both stages alike): `window`, else the longest factor * k + 1 that the
        coarsest trained stage can cut from clips of `clip_frames` frames."""
        o = self.opts
        if o.window:
            return o.window
        stride = o.factor if 0 in o.stages else 1
        longest = (clip_frames - 1) // stride + 1
        return (longest - 1) // o.factor * o.factor + 1

    def training_inputs(self, latents: torch.Tensor, batch: dict, generator: torch.Generator | None) -> TaskInputs:
        o = self.opts
        b, _, f = latents.shape[:3]
        dev = latents.device
        stage = int(_choice(o.stages, o.stage_probs, 1, generator)[0])
        stride = 1 if stage == 1 else o.factor
        n = self.window(f)
        span = (n - 1) * stride + 1
        if n < o.factor + 1 or span > f:
            raise ValueError(
                f"interpolate: stage {stage} needs clips of {max(span, o.factor * stride + 1)} frames "
                f"(window {max(n, o.factor + 1)} at stride {stride}), got {f}: raise data.num_frames or train "
                "stages=[1]"
            )
        start = int(torch.randint(0, f - span + 1, (1,), generator=generator)[0])
        clip = latents[:, :, start : start + span : stride]
        mask = key_frame_mask(n, o.factor, dev)[None].expand(b, -1)
        mask = mask & (_rand(b, generator) >= o.context_dropout).to(dev)[:, None]
        # the clips' own rate: the stored rate over the loader's frame stride (or `fps`, already the clips'
        # rate); the output rate of this stage is that over the stage's stride (every factor-th frame in stage 0)
        stored = _clip_scalar(batch, o.fps_key, b, float("nan"))
        clip_fps = torch.where(
            stored.isnan(), torch.full_like(stored, o.fps), stored / float(batch.get("frame_stride", 1))
        )
        fps = clip_fps / stride
        conds = {"stage": torch.full((b,), float(stage), device=dev)}
        if o.fps_condition:
            conds["fps"] = fps.to(dev)
        kwargs = {"temporal_cond": context_condition(clip, mask), "conditions": conds}
        loss_mask = (~mask).to(latents.dtype)[:, None, :, None, None] if o.loss_frames == "generated" else None
        return TaskInputs(model_kwargs=kwargs, loss_mask=loss_mask, target_latents=clip.contiguous())


# ---------------------------------------------------------------------------- upsampling (§3.4)

# the SD x4 upscaler noises its low-res input with this schedule (LDM "linear" = diffusers scaled_linear)
LOW_RES_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")


def low_res_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**LOW_RES_SCHEDULE)


def make_lowres(pixels: torch.Tensor, scale: int, size: tuple[int, int]) -> torch.Tensor:
    """(b, c, f, H, W) pixels -> low-res frames (area-downsampled by `scale`) brought to `size` (the
    latent grid of the target): identical for an x4 latent upscaler (VAE factor 4), bicubic-upsampled
    back for a pixel-space upsampler."""
    b = pixels.shape[0]
    x = rearrange(pixels, "b c f h w -> (b f) c h w").float()
    x = F.interpolate(x, scale_factor=1 / scale, mode="area") if scale > 1 else x
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    return rearrange(x, "(b f) c h w -> b c f h w", b=b)


def noise_augment(
    lowres: torch.Tensor,
    noise_level: torch.Tensor,
    generator: torch.Generator | None = None,
    scheduler: DDPMScheduler | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise the low-res input to level t_g (paper §3.4 noise augmentation); (b,) integer levels.

    `noise` (the shape of `lowres`) is used when given: sampling draws it per sample from each sample's
    own seed, so a sample does not depend on the batch it is in; otherwise it comes from `generator`."""
    sched = scheduler or low_res_scheduler()
    if noise is None:
        noise = torch.randn(lowres.shape, generator=generator, dtype=torch.float32)
    elif noise.shape != lowres.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} for low-res frames of shape {tuple(lowres.shape)}")
    noise = noise.to(lowres.device, lowres.dtype)
    return sched.add_noise(lowres, noise, noise_level.long().to(lowres.device))


def noise_level_inputs(condition_via: str, noise_level: torch.Tensor) -> dict:
    """How t_g reaches the model: the image UNet's own class embedding, or a temporal scalar condition."""
    if condition_via == "unet":
        return {"unet_class_labels": noise_level.long()}
    return {"conditions": {"noise_level": noise_level.float()}}


@register
class UpsampleTask(_OptionsTask):
    """4x video upsampler: denoise the high-res latents given noise-augmented low-res frames concatenated
    to the input and the noise level as a condition; trained on patches."""

    name = "upsample"
    options_cls = UpsampleOptions

    def required_temporal_options(self) -> dict[str, Any]:
        if self.opts.condition_via == "temporal":
            return {"extra_in_channels": self.opts.lowres_channels, "scalar_conds": ("noise_level",)}
        return {}

    def training_inputs(self, latents: torch.Tensor, batch: dict, generator: torch.Generator | None) -> TaskInputs:
        o = self.opts
        b, _, _, h, w = latents.shape
        if o.pixels_key not in batch:
            raise KeyError(f"upsample task needs batch[{o.pixels_key!r}] (the clip's pixels) to make the low-res input")
        pixels = torch.as_tensor(batch[o.pixels_key]).to(latents.device)
        if pixels.shape[0] != b:  # stage=image flattens clips into frames: (b f) c 1 h w
            pixels = rearrange(pixels, "b c f h w -> (b f) c 1 h w")
        lowres = make_lowres(pixels, o.scale, (h, w)).to(latents.dtype)
        level = torch.randint(0, o.max_noise_level + 1, (b,), generator=generator)
        lowres = noise_augment(lowres, level, generator)
        target = latents
        if o.patch_size and o.patch_size < min(h, w):
            p = o.patch_size
            ys = torch.randint(0, h - p + 1, (b,), generator=generator).tolist()
            xs = torch.randint(0, w - p + 1, (b,), generator=generator).tolist()
            target = torch.stack([latents[i, :, :, y : y + p, x : x + p] for i, (y, x) in enumerate(zip(ys, xs))])
            lowres = torch.stack([lowres[i, :, :, y : y + p, x : x + p] for i, (y, x) in enumerate(zip(ys, xs))])
        kwargs = noise_level_inputs(o.condition_via, level.to(latents.device))
        return TaskInputs(model_kwargs=kwargs, extra_channels=lowres.contiguous(), target_latents=target.contiguous())


__all__ = [
    "InterpolateOptions",
    "InterpolateTask",
    "PredictOptions",
    "PredictTask",
    "UpsampleOptions",
    "UpsampleTask",
    "context_condition",
    "first_frames_mask",
    "interpolated_length",
    "key_frame_mask",
    "make_lowres",
    "noise_augment",
    "noise_level_inputs",
]

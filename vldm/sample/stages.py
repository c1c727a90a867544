"""One function per cascade stage, on latents `b c f h w`: key frames, prediction rollout, interpolation,
upsampling. Each takes a `StageModel` (a VideoLDMUNet and what its training run says about it) and the
encoded text, and builds the conditioning of `vldm.tasks.paper` for the one denoising loop
(`vldm.diffusion.sampler`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vldm.config.core import from_dict
from vldm.config.sample import SampleConfig
from vldm.diffusion.sampler import Conditioning, Known, denoise, initial_noise, latent_channels, subseed, windowed
from vldm.models.video_unet import VideoLDMUNet
from vldm.tasks.paper import (
    InterpolateOptions,
    UpsampleOptions,
    context_condition,
    first_frames_mask,
    interpolated_length,
    key_frame_mask,
    make_lowres,
    noise_augment,
    noise_level_inputs,
)


@dataclass
class StageModel:
    """A trained model of the cascade and the facts of its run that sampling needs."""

    model: VideoLDMUNet
    task: str = "generate"
    task_options: dict = field(default_factory=dict)
    clip_frames: int = 8  # frames per training clip (data.num_frames of its run)
    size: int = 32  # pixel height of its training clips (data.size of its run)
    width: int = 0  # pixel width when it differs (data.width; 0 = square)
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""  # where it was loaded from (reports)

    @property
    def latent_channels(self) -> int:
        return latent_channels(self.model)


@dataclass
class TextInputs:
    """Encoded prompts of a batch: spatial text, optional original-encoder text for the temporal layers
    (personalised models, paper §4.2), negative prompt, class label."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    temporal_cond: torch.Tensor | None = None
    temporal_uncond: torch.Tensor | None = None
    class_label: int = -1

    def kwargs(self, model: VideoLDMUNet, negative: bool) -> dict[str, Any]:
        # without a negative prompt the unconditional branch differs by its class label only
        text = self.uncond if negative and self.uncond is not None else self.cond
        out: dict[str, Any] = {"encoder_hidden_states": text}
        t_text = self.temporal_uncond if negative and self.temporal_uncond is not None else self.temporal_cond
        if t_text is not None:
            out["temporal_encoder_hidden_states"] = t_text
        n = model.opts.num_class_labels
        if n:
            label = n if (negative or self.class_label < 0) else self.class_label  # n = "no label"
            out["class_labels"] = torch.full((text.shape[0],), label, dtype=torch.long, device=text.device)
        return out


@dataclass
class Run:
    """Shared settings of one `generate` call."""

    cfg: SampleConfig
    seeds: list[int]
    on_step: Callable[[], Any] | None = None

    def guidance(
        self,
        text: TextInputs,
        model: VideoLDMUNet,
        extra: dict | None = None,
        no_context: dict | None = None,
        context_scale: float | None = None,
        text_scale: float | None = None,
    ) -> Conditioning:
        extra = extra or {}
        cond = {**text.kwargs(model, False), **extra}
        scale = self.cfg.guidance_scale if text_scale is None else text_scale
        no_text = (
            {**text.kwargs(model, True), **extra} if text.uncond is not None or model.opts.num_class_labels else None
        )
        if no_text is None:
            scale = 1.0
        return Conditioning(
            cond=cond,
            no_text=no_text,
            no_context={**cond, **no_context} if no_context else None,
            text_scale=scale,
            context_scale=self.cfg.context_guidance if context_scale is None else context_scale,
        )


def _denoise(stage: StageModel, run: Run, shape: tuple, tags: tuple, cond: Conditioning, **kw: Any) -> torch.Tensor:
    m = stage.model
    return denoise(
        m,
        shape,
        [subseed(s, *tags) for s in run.seeds],
        stage.scheduler_config,
        cond,
        steps=run.cfg.steps,
        sampler=run.cfg.sampler,
        device=m.device,
        dtype=m.dtype,
        on_step=run.on_step,
        eta=run.cfg.eta,
        **kw,
    )


def _band(run: Run, num_frames: int, trained_frames: int) -> dict:
    """Banded temporal self-attention for sequences longer than the model was trained on (and the band)."""
    band = run.cfg.attn_band
    return {"attn_band": band} if band and num_frames > max(band, trained_frames) else {}


def keyframes(
    stage: StageModel, text: TextInputs, run: Run, num_frames: int, hw: tuple[int, int], image_mode: bool = False
) -> torch.Tensor:
    """`num_frames` frames in one pass (temporal self-attention banded to `attn_band` frames beyond the
    model's training length); with `image_mode` every frame independently by the image model."""
    c = stage.latent_channels
    extra = {"image_only": True} if image_mode else _band(run, num_frames, stage.clip_frames)
    if stage.model.opts.temporal_cond_channels:  # a prediction model used unconditionally (S = 0)
        extra["temporal_cond"] = _empty_context(text.cond, c, num_frames, hw)
    return _denoise(stage, run, (c, num_frames, *hw), ("keyframes",), run.guidance(text, stage.model, extra))


def _empty_context(like: torch.Tensor, c: int, f: int, hw: tuple[int, int]) -> torch.Tensor:
    b = like.shape[0]
    return torch.zeros(b, c + 1, f, *hw, device=like.device, dtype=like.dtype)


def rollout(
    stage: StageModel,
    text: TextInputs,
    run: Run,
    num_frames: int,
    hw: tuple[int, int],
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """A video of `num_frames` frames from a prediction model (paper §3.2, long video generation).

    Without `start`: the first frame from the image model (f = 1: temporal layers skipped), then a chunk
    with S = 1 context frame, then chunks with S = 2, each conditioned on the newest frames. With `start`
    (b, c, k, h, w) the video continues those frames, which appear in the output unchanged.
    Each chunk has the model's training length; context guidance scale `context_guidance`.
    """
    f = stage.clip_frames
    if f < 3:
        raise ValueError(f"prediction model clips of {f} frames leave no room after 2 context frames")
    c = stage.latent_channels
    if start is None:
        cond = run.guidance(text, stage.model, {"temporal_cond": _empty_context(text.cond, c, 1, hw)})
        video = _denoise(stage, run, (c, 1, *hw), ("rollout", "first"), cond)
    else:
        video = start.to(stage.model.device, stage.model.dtype)
    chunk = 0
    while video.shape[2] < num_frames:
        s = min(2, video.shape[2])
        b = video.shape[0]
        given = torch.zeros(b, c, f, *hw, device=video.device, dtype=video.dtype)
        given[:, :, :s] = video[:, :, -s:]
        mask = first_frames_mask(torch.full((b,), s, device=video.device), f)
        cond = run.guidance(
            text,
            stage.model,
            {"temporal_cond": context_condition(given, mask)},
            no_context={"temporal_cond": _empty_context(video, c, f, hw)},
        )
        x = _denoise(stage, run, (c, f, *hw), ("rollout", chunk), cond, known=Known(given, mask))
        video = torch.cat([video, x[:, :, s:]], 2)
        chunk += 1
    return video[:, :, :num_frames]


def rollout_chunks(num_frames: int, clip_frames: int, start_frames: int = 0) -> int:
    """Denoising passes `rollout` makes (for progress bars): first frame, then chunks of f - S new frames."""
    n, have = (0, start_frames) if start_frames else (1, 1)
    while have < num_frames:
        have += clip_frames - min(2, have)
        n += 1
    return n


def interp_options(stage: StageModel) -> InterpolateOptions:
    return from_dict(InterpolateOptions, stage.task_options, prefix="task_options")


def interp_window(stage: StageModel) -> int:
    from vldm.tasks.paper import InterpolateTask

    return InterpolateTask(**stage.task_options).window(stage.clip_frames)


def interpolate(
    stage: StageModel, text: TextInputs, run: Run, keys: torch.Tensor, stage_label: int, fps_out: float
) -> torch.Tensor:
    """(b, c, T, h, w) key frames -> (b, c, factor (T - 1) + 1, h, w), key frames kept at every factor-th
    position exactly (paper §3.3); windows of the model's training length share their end key frames."""
    o = interp_options(stage)
    factor = o.factor
    per_window = (interp_window(stage) - 1) // factor + 1  # key frames per window
    b, c, t, h, w = keys.shape
    out = torch.zeros(b, c, interpolated_length(t, factor), h, w, device=keys.device, dtype=keys.dtype)
    out[:, :, ::factor] = keys
    for wi, k0 in enumerate(range(0, t - 1, per_window - 1)):
        k1 = min(k0 + per_window - 1, t - 1)
        n = interpolated_length(k1 - k0 + 1, factor)
        given = torch.zeros(b, c, n, h, w, device=keys.device, dtype=keys.dtype)
        given[:, :, ::factor] = keys[:, :, k0 : k1 + 1]
        mask = key_frame_mask(n, factor, keys.device)[None].expand(b, -1)
        conds = {"stage": torch.full((b,), float(stage_label), device=keys.device)}
        if o.fps_condition:
            conds["fps"] = torch.full((b,), float(fps_out), device=keys.device)
        extra = {
            "temporal_cond": context_condition(given, mask),
            "conditions": conds,
            **_band(run, n, interp_window(stage)),
        }
        cond = run.guidance(text, stage.model, extra, no_context={"temporal_cond": _empty_context(given, c, n, (h, w))})
        x = _denoise(stage, run, (c, n, h, w), ("interpolate", stage_label, wi), cond, known=Known(given, mask))
        out[:, :, factor * k0 : factor * k1 + 1] = x
    return out


def interp_windows(stage: StageModel, num_keys: int) -> int:
    per_window = (interp_window(stage) - 1) // interp_options(stage).factor + 1
    return len(range(0, num_keys - 1, per_window - 1))


def upsample(
    stage: StageModel,
    text: TextInputs,
    run: Run,
    pixels: torch.Tensor,
    out_hw: tuple[int, int],
    low_res_scheduler=None,
    image_mode: bool = False,
) -> torch.Tensor:
    """Low-res pixels (b, 3, f, H, W) -> high-res latents (b, c, f, h', w') (paper §3.4).

    The low-res frames are noise-augmented to `upsample_noise_level` and concatenated to the input at
    every step; the noise level is a condition. The model runs fully convolutionally on the whole frame
    and over overlapping windows of `upsample_window` frames; with `image_mode` every frame on its own (the
    image upscaler: temporal layers skipped).
    """
    o = from_dict(UpsampleOptions, stage.task_options, prefix="task_options")
    cfg = run.cfg
    m = stage.model
    b, _, f = pixels.shape[:3]
    lowres = make_lowres(pixels.to(m.device), 1, out_hw).to(m.dtype)
    level = torch.full((b,), int(cfg.upsample_noise_level), device=m.device)
    # augmentation noise row i from sample i's seed: a sample's output does not depend on its batch
    aug = initial_noise(tuple(lowres.shape[1:]), [subseed(s, "upsample-noise") for s in run.seeds], "cpu")
    lowres = noise_augment(lowres, level, scheduler=low_res_scheduler, noise=aug)
    extra = noise_level_inputs(o.condition_via, level)
    if image_mode:
        extra["image_only"] = True
    cond = run.guidance(text, m, extra, text_scale=cfg.upsample_guidance_scale or cfg.guidance_scale)
    model_fn = windowed(m, cfg.upsample_window, cfg.upsample_overlap)
    return denoise(
        model_fn,
        (stage.latent_channels, f, *out_hw),
        [subseed(s, "upsample") for s in run.seeds],
        stage.scheduler_config,
        cond,
        steps=cfg.steps,
        sampler=cfg.sampler,
        device=m.device,
        dtype=m.dtype,
        extra_channels=lowres,
        on_step=run.on_step,
        eta=cfg.eta,
    )

"""Sampling section: how `vldm.sample` runs the cascade (key frames -> prediction -> interpolation ->
decoder -> upsampler). The CLI's flags and `generate()`'s arguments override these defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_


@dataclass
class SampleConfig:
    num_frames: int = field_(
        16, "frames of the output video (key frames, rolled out and interpolated as needed, then cut to this length)"
    )
    height: int = field_(
        0, "pixel height of the key frames (0 = the key-frame run's data.size); the upsampler multiplies it"
    )
    width: int = field_(0, "pixel width of the key frames (0 = the key-frame run's data.size)")
    steps: int = field_(25, "denoising steps of every diffusion stage")
    sampler: Literal["ddim", "dpm"] = field_(
        "ddim", "diffusers scheduler: DDIM (the paper's) or DPM-Solver++ (multistep)"
    )
    eta: float = field_(0.0, "DDIM eta (0 = deterministic)")
    guidance_scale: float = field_(7.5, "text / class guidance scale (1 = off)")
    context_guidance: float = field_(
        1.5, "guidance over the context frames of prediction and interpolation (paper §3.2; 1 = off)"
    )
    negative_prompt: str = field_("", "prompt of the unconditional text branch")
    class_label: int = field_(-1, "class label of class-conditional models (-1 = none: the 'no label' class)")
    seed: int = field_(0, "seed of video i is seed + i; every chunk and window derives its noise from it")
    fps: float = field_(
        8.0,
        "frame rate of the key frames; each interpolation pass multiplies it (written to the mp4, and the fps "
        "condition)",
    )
    interp_passes: int = field_(
        1,
        "interpolation passes when an interpolation model is given: 0, 1 (x4 frame rate) or 2 (x16; stage labels 0 "
        "then 1)",
    )
    attn_band: int = field_(
        8,
        "when a model runs on more frames than it was trained on (and than the band), its temporal self-attention "
        "sees only frames within this band (0 = never)",
    )
    decoder_window: int = field_(16, "frames the video decoder decodes at once (overlapping windows, cross-faded)")
    decoder_overlap: int = field_(4, "overlap of the decoder's windows")
    upsample: bool = field_(True, "run the upsampler when one is given")
    upsample_noise_level: int = field_(
        20, "noise augmentation level t_g of the low-res input at sampling (<= the model's max, 350 for SD x4)"
    )
    upsample_guidance_scale: float = field_(0.0, "text guidance of the upsampler (0 = guidance_scale)")
    upsample_window: int = field_(8, "frames the upsampler denoises at once (overlapping windows, outputs blended)")
    upsample_overlap: int = field_(2, "overlap of the upsampler's windows")
    image_mode: bool = field_(
        False, "sample every frame independently with the image model (temporal layers skipped, image decoder)"
    )
    device: Literal["auto", "cpu", "cuda"] = field_("auto", "auto = cuda when available")
    dtype: Literal["float32", "float16", "bfloat16"] = field_("float32", "model dtype (half precision on GPU)")

    def validate(self) -> None:
        if self.num_frames < 1 or self.steps < 1:
            raise ConfigError("num_frames and steps must be >= 1")
        if self.interp_passes not in (0, 1, 2):
            raise ConfigError("interp_passes: 0, 1 or 2")
        if self.decoder_overlap >= self.decoder_window or self.upsample_overlap >= self.upsample_window:
            raise ConfigError("decoder_overlap / upsample_overlap must be smaller than their window")

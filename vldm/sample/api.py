"""The Video LDM cascade in Python: key frames -> prediction rollout -> interpolation -> decoder -> upsampler.

    from vldm.sample import Cascade, generate
    cascade = Cascade.from_runs("runs/keyframes", predict_run="runs/predict", interp_run="runs/interp",
                                decoder_run="runs/decoder", upsampler_run="runs/upsampler")
    out = generate(cascade, ["a red car driving at night"], num_frames=64, steps=50)
    out.save("car.mp4")

Frame plan for N output frames with an interpolation factor k (4 in the paper) and p passes: T =
ceil((N - 1) / k^p) + 1 key frames, from (in order of preference) the prediction rollout (first frame
by the image model, then S = 1, then S = 2 chunks; §3.2), the key-frame model followed by a rollout,
or the key-frame model alone on all T frames with temporal attention banded to `attn_band` frames;
then p interpolation passes (stage labels 0, 1 for two; the finest, 1, for one) give k^p (T - 1) + 1
frames, cut to N. Every stage is optional except the first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vldm.checkpoint import RUN_CONFIG
from vldm.config.core import from_dict, load_yaml, to_dict
from vldm.config.model import ModelConfig
from vldm.config.sample import SampleConfig
from vldm.diffusion.sampler import decode_latents
from vldm.io import write_mp4
from vldm.models.base import Components, encode_text, load_components
from vldm.models.personalize import fuse_lora, personalize
from vldm.models.temporal_decoder import VideoDecoder
from vldm.models.upsampler import load_low_res_scheduler
from vldm.sample import stages
from vldm.sample.runs import checkpoint_dir, load_decoder, load_stage
from vldm.sample.stages import Run, StageModel, TextInputs
from vldm.tasks.paper import UpsampleOptions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@dataclass
class Cascade:
    """The models of one Video LDM. Only `keyframes` (a generate or predict model) is required.

    `components`: the key-frame base model's VAE, text encoder and tokenizer (shared by the key-frame,
    prediction and interpolation models, which sit on the same image model). `temporal_text`: the
    original text encoder when the spatial layers were personalised (paper §4.2). The upsampler has its
    own VAE (`upsampler_vae`, None = pixel space) and text encoder (`upsampler_text`).
    """

    keyframes: StageModel
    components: Components
    predictor: StageModel | None = None
    interpolator: StageModel | None = None
    decoder: VideoDecoder | None = None
    upsampler: StageModel | None = None
    upsampler_vae: Any = None
    upsampler_text: Components | None = None
    low_res_scheduler: Any = None
    temporal_text: Components | None = None

    def __post_init__(self) -> None:
        expected = {
            "keyframes": ("generate", "predict"),
            "predictor": ("predict",),
            "interpolator": ("interpolate",),
            "upsampler": ("upsample",),
        }
        for name, tasks in expected.items():
            stage = getattr(self, name)
            if stage is not None and stage.task not in tasks:
                raise ValueError(
                    f"the {name} stage needs a model trained with task {' or '.join(tasks)}, "
                    f"got task={stage.task!r} ({stage.source or 'in memory'})"
                )

    @property
    def device(self) -> torch.device:
        return self.keyframes.model.device

    def rollout_model(self) -> StageModel | None:
        if self.keyframes.task == "predict":
            return self.keyframes
        return self.predictor

    def interp_factor(self) -> int:
        return stages.interp_options(self.interpolator).factor if self.interpolator is not None else 1

    @classmethod
    def from_runs(
        cls,
        run: str | Path,
        predict_run: str | Path | None = None,
        interp_run: str | Path | None = None,
        decoder_run: str | Path | None = None,
        upsampler_run: str | Path | None = None,
        personalized: str | Path | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
        ema: bool = False,
        device: str = "auto",
        dtype: str = "float32",
    ) -> Cascade:
        """Each stage from its training run directory (newest complete checkpoint) or a checkpoint.

        `personalized`: a fine-tuned image model directory (unet/, text_encoder/, tokenizer/) whose UNet
        replaces the spatial layers of the key-frame, prediction and interpolation models and whose text
        encoder feeds them; the temporal layers keep the runs' original text encoder. `lora` is fused
        into that UNet first.
        """
        dev, dt = resolve_device(device), DTYPES[dtype]
        shared: dict[str, Components] = {}  # one frozen image model per base, whatever the number of stages on it
        key, comps = load_stage(run, ema, dev, dt, shared)
        pred = load_stage(predict_run, ema, dev, dt, shared)[0] if predict_run else None
        interp = load_stage(interp_run, ema, dev, dt, shared)[0] if interp_run else None
        dec = load_decoder(decoder_run, dev, dt) if decoder_run else None
        up = up_comps = low_res = None
        if upsampler_run:
            up, up_comps = load_stage(upsampler_run, ema, dev, dt, shared)
            pretrained = load_yaml(checkpoint_dir(upsampler_run) / RUN_CONFIG).get("model", {}).get("pretrained", "")
            low_res = load_low_res_scheduler(pretrained)  # the upscaler's own noise-augmentation schedule
        cascade = cls(key, comps, pred, interp, dec, up, up_comps.vae if up_comps else None, up_comps, low_res)
        if personalized:
            cascade.personalize(personalized, lora, lora_scale)
        return cascade

    def personalize(self, model_dir: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0) -> None:
        """Put the temporal layers onto a fine-tuned (e.g. DreamBooth) image model (paper §4.2)."""
        tuned = load_components(ModelConfig(pretrained=str(model_dir)), load_vae=False)
        if lora is not None:
            fuse_lora(tuned.unet2d, lora, lora_scale)
        for name in ("keyframes", "predictor", "interpolator"):
            stage = getattr(self, name)
            if stage is not None and not (name == "predictor" and stage is self.keyframes):
                setattr(
                    self,
                    name,
                    dataclasses.replace(stage, model=personalize(stage.model, tuned.unet2d).to(stage.model.dtype)),
                )
        self.temporal_text = Components(
            unet2d=self.components.unet2d,
            text_encoder=self.components.text_encoder,
            tokenizer=self.components.tokenizer,
        )
        self.components = dataclasses.replace(
            self.components, text_encoder=tuned.text_encoder, tokenizer=tuned.tokenizer
        )


@dataclass
class VideoOutput:
    videos: torch.Tensor  # (b, 3, f, H, W) in [-1, 1], float32 on the CPU
    fps: float
    latents: torch.Tensor  # the key-frame-model latents after interpolation (b, c, f, h, w)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    frames: dict[str, int] = field(default_factory=dict)  # frames produced by each stage

    def save(self, path: str | Path) -> list[Path]:
        """One mp4 per video: `path` itself for a single video, else path_000.mp4, path_001.mp4, ..."""
        p = Path(path)
        if len(self.videos) == 1:
            return [write_mp4(p, self.videos[0], self.fps)]
        stem = p.with_suffix("")
        return [write_mp4(f"{stem}_{i:03d}.mp4", v, self.fps) for i, v in enumerate(self.videos)]


def plan_key_frames(num_frames: int, factor: int, passes: int) -> int:
    """Key frames T whose `passes`-fold interpolation covers `num_frames`: k^p (T - 1) + 1 >= N."""
    if passes == 0 or factor == 1:
        return num_frames
    return math.ceil((num_frames - 1) / factor**passes) + 1


def _text(
    comps: Components, prompts: list[str], negative: str, need_uncond: bool, device, dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cond = encode_text(comps, prompts, device, dtype)
    if not need_uncond:
        return cond, None
    if comps.text_encoder is None:  # no text encoder: the "text" is a fixed zero context either way
        return cond, torch.zeros_like(cond)
    return cond, encode_text(comps, [negative] * len(prompts), device, dtype)


def encode_prompts(
    cascade: Cascade, comps: Components, prompts: list[str], cfg: SampleConfig, temporal: bool = True
) -> TextInputs:
    dev, dt = cascade.device, cascade.keyframes.model.dtype
    cond, uncond = _text(comps, prompts, cfg.negative_prompt, True, dev, dt)
    out = TextInputs(cond=cond, uncond=uncond, class_label=cfg.class_label)
    if temporal and cascade.temporal_text is not None:
        out.temporal_cond, out.temporal_uncond = _text(
            cascade.temporal_text, prompts, cfg.negative_prompt, True, dev, dt
        )
    return out


@torch.no_grad()
def generate(
    cascade: Cascade,
    prompts: list[str] | str,
    cfg: SampleConfig | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> VideoOutput:
    """Generate one video per prompt with the whole cascade; `overrides` are SampleConfig fields."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cfg = from_dict(SampleConfig, {**to_dict(cfg or SampleConfig()), **overrides})
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(prompts))]
    key = cascade.keyframes
    comps = cascade.components
    vsf = comps.vae_scale_factor
    height, width = cfg.height or key.size, cfg.width or key.width or key.size
    if height % vsf or width % vsf:
        raise ValueError(f"{height}x{width} is not divisible by the VAE factor {vsf}")
    hw = (height // vsf, width // vsf)
    image_mode = cfg.image_mode
    passes = 0 if (image_mode or cascade.interpolator is None) else cfg.interp_passes
    factor = cascade.interp_factor()
    n_keys = plan_key_frames(cfg.num_frames, factor, passes)
    roll = None if image_mode else cascade.rollout_model()
    timings: dict[str, float] = {}
    frames: dict[str, int] = {}

    # the progress bar counts denoising steps over every stage
    total = _planned_passes(cascade, cfg, n_keys, passes, roll) * cfg.steps
    bar = tqdm(total=total, desc="sampling", unit="step", disable=not progress, leave=False)
    run = Run(cfg, seeds, on_step=lambda: bar.update(1))
    text = encode_prompts(cascade, comps, prompts, cfg)

    t0 = time.perf_counter()
    if roll is not None and key.task == "predict":
        bar.set_description("key frames (rollout)")
        z = stages.rollout(roll, text, run, n_keys, hw)
    elif roll is not None and n_keys > key.clip_frames:
        bar.set_description("key frames")
        z = stages.keyframes(key, text, run, key.clip_frames, hw)
        bar.set_description("rollout")
        z = stages.rollout(roll, text, run, n_keys, hw, start=z)
    else:
        bar.set_description("key frames")
        z = stages.keyframes(key, text, run, n_keys, hw, image_mode=image_mode)
    timings["keyframes"] = time.perf_counter() - t0
    frames["keyframes"] = z.shape[2]

    fps = cfg.fps
    for p in range(passes):
        t0 = time.perf_counter()
        label = 1 if passes == 1 else p  # two passes: stage 0 then 1; one pass: the finest stage
        fps *= factor
        bar.set_description(f"interpolation {p + 1}/{passes}")
        z = stages.interpolate(cascade.interpolator, text, run, z, label, fps)
        timings[f"interpolation{p + 1}"] = time.perf_counter() - t0
        frames[f"interpolation{p + 1}"] = z.shape[2]
    z = z[:, :, : cfg.num_frames]

    t0 = time.perf_counter()
    bar.set_description("decoding")
    if cascade.decoder is not None:
        videos = cascade.decoder.decode(z, cfg.decoder_window, cfg.decoder_overlap, image_only=image_mode)
    else:
        videos = decode_latents(comps.vae, z)
        if comps.vae is None:  # latent-only model: show the first 3 latent channels
            videos = videos[:, :3]
    timings["decoder"] = time.perf_counter() - t0
    frames["decoder"] = videos.shape[2]

    if cascade.upsampler is not None and cfg.upsample and not image_mode:
        t0 = time.perf_counter()
        bar.set_description("upsampler")
        videos = _upsample(cascade, prompts, run, videos)
        timings["upsampler"] = time.perf_counter() - t0
        frames["upsampler"] = videos.shape[2]
    bar.close()
    return VideoOutput(videos=videos.float().cpu(), fps=fps, latents=z.float().cpu(), timings=timings, frames=frames)


def _upsample(cascade: Cascade, prompts: list[str], run: Run, videos: torch.Tensor) -> torch.Tensor:
    up = cascade.upsampler
    o = from_dict(UpsampleOptions, up.task_options, prefix="task_options")
    vae = cascade.upsampler_vae
    up_vsf = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    H, W = videos.shape[-2:]
    out_hw = (H * o.scale // up_vsf, W * o.scale // up_vsf)
    comps = cascade.upsampler_text or cascade.components
    cond, uncond = _text(comps, prompts, run.cfg.negative_prompt, True, up.model.device, up.model.dtype)
    z = stages.upsample(up, TextInputs(cond, uncond), run, videos, out_hw, cascade.low_res_scheduler)
    if vae is None:
        return z.clamp(-1, 1)
    return decode_latents(vae, z)


def _planned_passes(cascade: Cascade, cfg: SampleConfig, n_keys: int, passes: int, roll: StageModel | None) -> int:
    key = cascade.keyframes
    if roll is not None and key.task == "predict":
        n = stages.rollout_chunks(n_keys, roll.clip_frames)
    elif roll is not None and n_keys > key.clip_frames:
        n = 1 + stages.rollout_chunks(n_keys, roll.clip_frames, start_frames=key.clip_frames)
    else:
        n = 1
    keys = n_keys
    for _ in range(passes):
        n += stages.interp_windows(cascade.interpolator, keys)
        keys = (keys - 1) * cascade.interp_factor() + 1
    if cascade.upsampler is not None and cfg.upsample and not cfg.image_mode:
        n += 1
    return n

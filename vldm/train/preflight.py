"""Checks of a resolved config that types alone cannot express; each failure names the key.

Run by `python -m vldm.train --check` (the sbatch script calls it in the batch shell, before srun
starts any rank) and at the start of every training process. Imports nothing heavy unless the config
names a task with options.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from vldm.config.core import ConfigError
from vldm.config.schema import Config
from vldm.config.tasks import TASK_OPTIONS, check_task_options


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def check(cfg: Config, cuda: bool | None = None) -> list[str]:
    """Raise ConfigError for a config that cannot run here; return warnings for ones that can."""
    warnings: list[str] = []
    m = cfg.model
    if m.pretrained:
        root = Path(m.pretrained).expanduser()
        if not root.is_dir():
            raise ConfigError(f"model.pretrained: {root} is not a local directory (nothing is downloaded)")
        if not (root / "unet").is_dir() and cfg.stage == "temporal":
            raise ConfigError(
                f"model.pretrained: {root} has no unet/ (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, "
                "scheduler/)"
            )
        if not cfg.data.use_latents and not m.pixel_space and not (root / "vae").is_dir():
            raise ConfigError(
                f"data.use_latents: false needs a VAE, and {root} has no vae/ (use latent shards or add the VAE)"
            )
        sched = root / "scheduler" / "scheduler_config.json"
        if cfg.stage == "temporal" and sched.is_file():  # the frozen image UNet keeps its parameterisation
            from vldm.diffusion.schedule import check_parameterisation

            check_parameterisation(cfg.diffusion, json.loads(sched.read_text()), image_unet_trained=False)
    if m.temporal_weights and not Path(m.temporal_weights).exists():
        raise ConfigError(f"model.temporal_weights: {m.temporal_weights} does not exist")
    if m.pixel_space and (
        (m.pretrained and (Path(m.pretrained).expanduser() / "vae").is_dir()) or cfg.data.use_latents
    ):
        raise ConfigError(
            "model.pixel_space: a pixel-space model has no VAE: no vae/ in model.pretrained and data.use_latents=false"
        )
    if cfg.stage == "decoder":
        # the decoder fine-tunes the autoencoder on pixels: no diffusion task, no latent shards
        if not m.pretrained or not (Path(m.pretrained).expanduser() / "vae").is_dir():
            raise ConfigError("model.pretrained: stage=decoder needs a model directory with vae/ (an AutoencoderKL)")
        if cfg.data.use_latents:
            raise ConfigError(
                "data.use_latents: stage=decoder trains on pixels (the decoder reconstructs them); set it to false"
            )
        if cfg.task != "generate":
            raise ConfigError(f"task: stage=decoder has no diffusion task (got task={cfg.task!r})")
    if cfg.stage == "image":
        # an image model on frames: plain generation, or the image upscaler of a pixel-space video upsampler
        # (driving case), whose class embedding takes the noise level
        if cfg.task not in ("generate", "upsample"):
            raise ConfigError(
                f"task: stage=image trains the image model on frames; task={cfg.task!r} needs stage=temporal"
            )
        if cfg.task == "upsample":
            if cfg.task_options.get("condition_via", "unet") != "unet":
                raise ConfigError(
                    "task_options.condition_via: stage=image has no temporal layers; the image upscaler takes the "
                    "noise level as its class label (condition_via: unet)"
                )
            if cfg.diffusion.label_key:
                raise ConfigError(
                    "diffusion.label_key: the image upscaler's class embedding holds the noise level; no class labels"
                )
        if cfg.train.image_ratio:
            raise ConfigError("train.image_ratio: joint image/video batches are for stage=temporal")
    elif cfg.train.image_ratio:
        warnings.append(
            "train.image_ratio > 0 with frozen spatial layers: image rows (a = 1) give the temporal layers no "
            "gradient; they only keep the loss of image mode in view"
        )
    if cfg.diffusion.label_key:
        if cfg.stage == "temporal" and m.temporal.num_class_labels < 1:
            raise ConfigError("diffusion.label_key: class labels need model.temporal.num_class_labels >= 1")
        if cfg.stage == "image" and m.unet.num_class_embeds < 2 and not m.pretrained:
            raise ConfigError(
                "diffusion.label_key: class labels in stage=image need model.unet.num_class_embeds = classes + 1 "
                "(last = no label)"
            )
        n = m.temporal.num_class_labels if cfg.stage == "temporal" else m.unet.num_class_embeds - 1
        if cfg.diffusion.class_names and len(cfg.diffusion.class_names) != n:
            raise ConfigError(f"diffusion.class_names: {len(cfg.diffusion.class_names)} names for {n} classes")
    if cfg.task in TASK_OPTIONS:
        check_task_options(cfg.task, cfg.task_options)  # the built-in tasks: torch-free, the sbatch check stays fast
    else:  # a task registered by user code: build it (imports torch)
        from vldm.tasks import get_task

        try:
            get_task(cfg.task, **cfg.task_options)
        except KeyError as e:
            raise ConfigError(f"task: {e.args[0]}") from None
        except TypeError as e:
            raise ConfigError(f"task_options: task {cfg.task!r} takes no such options ({e})") from None
    d = cfg.deepspeed
    # torch is imported only when the answer matters: --check stays fast for the sbatch script
    if (d.precision == "fp16" or d.backend == "nccl") and not (_has_cuda() if cuda is None else cuda):
        if d.precision == "fp16":
            raise ConfigError("deepspeed.precision: fp16 needs a GPU (use fp32 or bf16 on CPU)")
        if d.backend == "nccl":
            raise ConfigError("deepspeed.backend: nccl needs GPUs (use gloo or auto)")
    if d.zero_stage == 0 and cfg.train.grad_accum > 1 and d.precision in ("bf16", "auto"):
        from vldm.train.engine import precision_problem

        gpu = d.precision == "bf16" or (_has_cuda() if cuda is None else cuda)  # auto: bf16 on a GPU
        problem = precision_problem(cfg, "bf16") if gpu else None
        if problem:
            raise ConfigError(problem)
    if cfg.wandb.mode == "online" and not _wandb_key_available():
        raise ConfigError(
            "wandb.mode: online needs WANDB_API_KEY (or `wandb login`); use offline and `wandb sync` later"
        )
    r = cfg.checkpoint.resume
    if r not in ("auto", "never") and not (Path(r) / "COMPLETE").exists():
        raise ConfigError(f"checkpoint.resume: {r} is not a complete checkpoint directory (auto, never or a path)")
    shards = cfg.data.shards
    if shards and "://" not in shards and not shards.startswith("pipe:"):
        for part in shards.split("::"):
            if not (Path(part).exists() or glob.glob(part) or "{" in part):
                raise ConfigError(f"data.shards: {part} matches nothing")
    _check_buckets(cfg)
    if shards and cfg.data.use_latents and cfg.stage != "decoder":
        warnings += check_latent_shards(cfg)
    if cfg.checkpoint.every > cfg.train.max_steps:
        warnings.append(
            f"checkpoint.every={cfg.checkpoint.every} > train.max_steps={cfg.train.max_steps}: only the final "
            "checkpoint is written"
        )
    return warnings


def _vae_factor(cfg: Config) -> int:
    """The pretrained VAE's downsampling factor (1 without a vae/ config: latents are the model's input)."""
    vae_cfg = Path(cfg.model.pretrained).expanduser() / "vae" / "config.json" if cfg.model.pretrained else None
    if vae_cfg is None or not vae_cfg.exists():
        return 1
    return 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)


def _check_buckets(cfg: Config) -> None:
    """A bucketed sharder output (local, with data.buckets on) trains each batch at its bucket's size, not at
    data.size: every bucket must fit the clip length and the VAE's factor, checked here before any rank starts
    (the loader would refuse a short bucket only once the ranks are up; a size the VAE does not divide would give
    latents of a size the shards' --encode-latents ones do not have)."""
    d = cfg.data
    index = Path(d.shards) / "_shards.json" if d.shards and d.buckets and "::" not in d.shards else None
    if index is None or "://" in d.shards or d.shards.startswith("pipe:") or not index.is_file():
        return
    try:
        buckets = json.loads(index.read_text()).get("buckets") or {}
    except ValueError as e:
        raise ConfigError(f"data.shards: {index} is not valid JSON ({e})") from None
    span = (d.num_frames - 1) * d.frame_stride + 1
    factor = _vae_factor(cfg)
    for name, b in buckets.items():
        if int(b["frames"]) < span:
            raise ConfigError(
                f"data.num_frames: bucket {name} has clips of {b['frames']} frames; data.num_frames={d.num_frames} "
                f"x data.frame_stride={d.frame_stride} needs {span} (drop the bucket, or train shorter clips)"
            )
        if int(b["height"]) % factor or int(b["width"]) % factor:
            raise ConfigError(
                f"data.shards: bucket {name} is not divisible by the VAE factor {factor} of model.pretrained "
                "(shard with bucket sizes that are multiples of it)"
            )


def _first_local_shard(spec: str) -> Path | None:
    """The first tar of a local `data.shards` (a directory, flat or bucketed, a glob or brace pattern)."""
    first = spec.split("::")[0]
    if "://" in first or first.startswith("pipe:"):
        return None  # remote: read by the loader, which names a shard without latents when it meets one
    root = Path(first).expanduser()
    if root.is_dir():
        tars = sorted(root.rglob("*.tar"))
        return tars[0] if tars else None
    from vldm.data.urls import expand

    try:
        urls = expand(first)
    except (FileNotFoundError, ValueError):
        return None
    return Path(urls[0]) if urls and Path(urls[0]).is_file() else None


def check_latent_shards(cfg: Config) -> list[str]:
    """data.use_latents: the shards must hold the VAE latents (data_prep --encode-latents); without text
    embeddings in them the text encoder must be in model.pretrained (it then encodes every caption at
    every step: a warning). Reads the member names of the first sample of the first shard only."""
    import tarfile

    from vldm.data.format import EXT_LATENTS, EXT_TEXT_EMB

    shard = _first_local_shard(cfg.data.shards)
    if shard is None:
        return []
    try:
        with tarfile.open(shard) as tar:
            names, key = [], None
            for m in tar:
                k, _, ext = Path(m.name).name.partition(".")
                if key is not None and k != key:
                    break
                key = k
                names.append(ext)
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"data.shards: cannot read {shard} ({e})") from None
    if EXT_LATENTS not in names:
        raise ConfigError(
            f"data.use_latents: true, but the shards hold no latents: sample {key!r} of {shard} has no "
            f"'{key}.{EXT_LATENTS}' (members: {', '.join(names) or 'none'}). Make the shards with "
            "data_prep/shard_videos.py --encode-latents --vae PATH (and --text-encoder PATH for text embeddings), "
            "or set data.use_latents=false to decode pixels and encode them with model.pretrained's VAE"
        )
    if EXT_TEXT_EMB not in names:
        root = Path(cfg.model.pretrained).expanduser() if cfg.model.pretrained else None
        if root is not None and not (root / "text_encoder").is_dir():
            raise ConfigError(
                f"data.shards: sample {key!r} of {shard} has no text embeddings ('{key}.{EXT_TEXT_EMB}') and "
                f"model.pretrained ({root}) has no text_encoder/: nothing can encode its captions"
            )
        return [
            f"data.shards: {shard} holds latents but no text embeddings ('.{EXT_TEXT_EMB}'): the text encoder "
            "encodes every caption at every step (shard with --text-encoder to precompute them)"
        ]
    return []

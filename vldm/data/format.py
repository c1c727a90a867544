"""THE sample format of vldm shards, defined once: the writer (shards.py, latents.py) and the readers
(loader.py, tests, tools) import every name, extension and field from here.

Shard `{prefix}-{shard:06d}.tar` (plain POSIX tar, readable by `webdataset.WebDataset`). A sample is
the consecutive members sharing a key:

    {key}.json          ClipMeta (UTF-8 JSON object, fields below)
    {key}.mp4           H.264 yuv420p clip: `frames` frames at `fps`, `height` x `width`
    {key}.txt           caption (UTF-8, may be empty)
    {key}.latents.npy   optional (--encode-latents): VAE latent means of every frame, (C, F, h, w),
                        already multiplied by the VAE's scaling_factor (after subtracting shift_factor
                        when it has one): feed them to the UNet as they are. json["latents"] says how.
    {key}.text.npy      optional: text-encoder last hidden state of the caption, (L, D)

Keys are `{source_id}_{clip:04d}`: source_id is the first 16 hex digits of sha1(source path). Keys have
no dots (WebDataset splits a member name at the first dot of its basename) and are stable across
runs, retries and output directories, so one clip always has one key.

Beside each shard (same directory):
    {prefix}-{shard:06d}.manifest.jsonl   one ManifestRow per sample, in tar order
    {prefix}-{shard:06d}.done.json        ShardSummary; written last: a shard is complete iff it exists
Run level:
    _plan.json, _inputs.jsonl   the fixed assignment of inputs to shards (reruns reuse it)
    _stats.json                 RunStats of the whole output
    _shards.json                {"shards": [{"name", "samples", "bytes", "latents"}]}: the loader's index
    failed.jsonl                one FailedRow per failed input; valid INPUT of a retry run
    rejected.jsonl              one RejectedRow per clip a filter rejected (--static/--jitter-threshold)
    {prefix}-{shard:06d}.shots.json   TransNetV2's shots of the shard's inputs (--shot-detector transnetv2)

With buckets (--buckets HxWxF,...; vldm.data.curate.buckets) each bucket directory OUTPUT/HxWxF/ is a flat
layout of its own (tars, manifests, done markers, its own _shards.json); the run-level files stay at the top,
where {prefix}-{shard:06d}.done.json then records the shard's buckets, and the top-level _shards.json is
    {"buckets": {"HxWxF": {"height", "width", "frames"}}, "shards": [{"name": "HxWxF/shard-000000.tar",
     "bucket": "HxWxF", "samples", "bytes", "latents"}]}
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# tar member extensions
EXT_JSON = "json"
EXT_MP4 = "mp4"
EXT_TXT = "txt"
EXT_LATENTS = "latents.npy"
EXT_TEXT_EMB = "text.npy"
# member order inside a sample (sorted, as webdataset's writer does)
SAMPLE_EXTS = (EXT_JSON, EXT_MP4, EXT_TXT)

SHARD_SUFFIX = ".tar"
MANIFEST_SUFFIX = ".manifest.jsonl"
DONE_SUFFIX = ".done.json"
PLAN_FILE = "_plan.json"
INPUTS_FILE = "_inputs.jsonl"
STATS_FILE = "_stats.json"
INDEX_FILE = "_shards.json"
FAILED_FILE = "failed.jsonl"
REJECTED_FILE = "rejected.jsonl"

# failed.jsonl reasons (a closed set: _stats.json counts them)
REASONS = {
    "missing": "the file does not exist or cannot be read",
    "empty": "zero-byte file",
    "unreadable": "not a media file FFmpeg may open (text, random bytes, playlists and other disallowed formats)",
    "no_video": "no video stream (e.g. audio only)",
    "too_short": "fewer frames at --fps than one clip",
    "low_fps": "source frame rate below --min-fps",
    "decode_error": "decoding failed before the first clip was complete (truncated or corrupt)",
    "timeout": "took longer than --video-timeout",
    "worker_crash": "the worker process died twice while processing it",
    "borders": "black bars: --borders reject, or with --borders crop more of the picture than --border-max",
    "error": "unexpected error (message in `error`)",
}

# rejected.jsonl reasons: clips cut from a good source that a filter turned down
CLIP_REASONS = {
    "static": "motion score below --static-threshold (a frozen or nearly still picture)",
    "jitter": "motion score above --jitter-threshold (shaking, strobing, noise)",
}

_KEY_RE = re.compile(r"^[0-9a-f]{16}_[0-9]{4,}$")


def source_id(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def clip_key(path: str, clip: int) -> str:
    return f"{source_id(path)}_{clip:04d}"


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def shard_name(prefix: str, shard: int) -> str:
    """Shard stem without suffix: `{prefix}-{shard:06d}`."""
    return f"{prefix}-{shard:06d}"


def split_member(name: str) -> tuple[str, str]:
    """tar member name -> (key, extension): the key ends at the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


@dataclass
class ClipMeta:
    """`{key}.json` of every sample."""

    key: str
    source: str  # the input path or URL, as listed
    source_id: str
    source_size: int
    source_mtime: float | None
    source_sha256: str | None  # only with --source-hash
    clip: int  # index of the clip within its source, 0-based, in time order
    start: float  # source timestamp (s) of the first frame
    end: float  # start + frames / fps
    fps: float
    frames: int
    height: int
    width: int
    caption: str
    source_fps: float | None
    source_width: int
    source_height: int
    source_codec: str
    source_duration: float | None
    rotation: int  # degrees applied to upright the source (display matrix)
    meta: dict[str, Any] = field(default_factory=dict)  # manifest columns / sidecar json, as given
    format_version: int = FORMAT_VERSION
    bucket: str = ""  # "HxWxF" of the clip (its height, width, frames), also without --buckets
    shot: int = 0  # index of the source's shot the clip lies in (0 without shot detection)
    shot_detector: str = "none"
    scores: dict[str, Any] = field(default_factory=dict)  # filter scores: motion, borders (fractions)

    def to_json(self) -> bytes:
        # not dataclasses.asdict: it deep-copies `meta` (a whole trajectory, say) for every clip
        return json.dumps(
            {f: getattr(self, f) for f in self.__dataclass_fields__}, ensure_ascii=False, sort_keys=True
        ).encode()


CLIP_META_FIELDS = tuple(f for f in ClipMeta.__dataclass_fields__)


@dataclass
class ManifestRow:
    key: str
    source: str
    clip: int
    start: float
    end: float
    frames: int
    mp4_bytes: int
    caption: str


@dataclass
class RejectedRow:
    """A clip a filter turned down: its key (as it would have been), where it was, why, and its scores."""

    key: str
    source: str
    clip: int
    start: float
    end: float
    reason: str
    scores: dict[str, Any]
    shard: str = ""


@dataclass
class FailedRow:
    """A failed input: `path`, `caption` and `meta` make it a valid manifest row for a retry run."""

    path: str
    reason: str
    error: str
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""


# columns of failed.jsonl that describe the failure, dropped when it is read back as a manifest
FAILURE_COLUMNS = ("reason", "error", "shard")


def decode_sample(members: dict[str, bytes]) -> tuple[dict, str]:
    """(json meta, caption) of a raw sample; raises ValueError if the json is missing or broken."""
    raw = members.get(EXT_JSON)
    if raw is None:
        raise ValueError("sample has no .json")
    # json builds no reference cycles: the cyclic GC has nothing to find here, but with batches of
    # metadata alive it would run during the parse and scan them (measured 1.5x the parse time)
    enabled = gc.isenabled()
    gc.disable()
    try:
        meta = json.loads(raw)
    finally:
        if enabled:
            gc.enable()
    if not isinstance(meta, dict):
        raise ValueError(".json is not an object")
    cap = members.get(EXT_TXT)
    caption = cap.decode("utf-8", "replace") if cap is not None else str(meta.get("caption", ""))
    return meta, caption

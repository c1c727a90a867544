"""The fixed assignment of inputs to shards, made once per OUTPUT and reused by every rerun.

Inputs are listed in a stable order (sorted directory walk, or manifest order) and shard i gets inputs
[i * V, (i + 1) * V). V (videos per shard) is given, or derived from a probe of a few inputs spread over
the list: from --samples-per-shard and their clips per input, or from --shard-bytes and also the bytes of
one clip of each (encoded for real, with the run's size/crf/preset: bitrate depends on content, so no
header-based guess would do). Sizes by bytes are therefore a target, like clip counts: a shard cannot
be closed "when full" without its content depending on timing and on x264's run-to-run bits. The list
and V are saved (`_inputs.jsonl`, `_plan.json`), so a rerun produces the same shards even if the
directory changed meanwhile, and a shard's content never depends on timing: that is what makes "rerun
after kill -9 gives every clip exactly once" hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vldm.config.data import ShardConfig, parse_bytes
from vldm.data.clips import ClipSpec, VideoError, open_video
from vldm.data.format import INPUTS_FILE, PLAN_FILE, shard_name
from vldm.data.sources import InputRecord
from vldm.io import atomic_write_bytes

log = logging.getLogger("vldm.data")

# options that change what is written; the others (workers, logging, ...) may differ between reruns
OUTPUT_SETTINGS = (
    "input",
    "frames",
    "fps",
    "size",
    "clip_stride",
    "max_clips",
    "spread",
    "shot_detector",
    "cut_threshold",
    "shot_threshold",
    "static_threshold",
    "jitter_threshold",
    "borders",
    "border_black",
    "border_min",
    "border_max",
    "buckets",
    "min_fps",
    "crf",
    "preset",
    "samples_per_shard",
    "shard_bytes",
    "videos_per_shard",
    "prefix",
    "source_hash",
    "extensions",
    "limit",
)
PROBE_SAMPLE = 24
TAR_BLOCK = 512


class PlanMismatch(ValueError):
    pass


@dataclass
class Plan:
    settings: dict[str, Any]
    videos_per_shard: int
    clips_per_video: float  # estimate, for the ETA
    duplicates: int
    inputs: list[InputRecord]
    bytes_per_clip: float = 0.0  # estimate (only measured with --shard-bytes)

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.inputs) / self.videos_per_shard) if self.inputs else 0

    def shard_name(self, i: int) -> str:
        return shard_name(self.settings["prefix"], i)

    def shard_inputs(self, i: int) -> list[tuple[int, InputRecord]]:
        lo = i * self.videos_per_shard
        return list(enumerate(self.inputs[lo : lo + self.videos_per_shard], start=lo))


def settings_of(cfg: ShardConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in OUTPUT_SETTINGS}


def sample_bytes(mp4: int, other: int = 2) -> int:
    """Bytes a sample takes in the tar: a header block per member, members padded to whole blocks. The
    json and txt members are well under one block each."""
    return TAR_BLOCK * (1 + -(-mp4 // TAR_BLOCK)) + other * 2 * TAR_BLOCK


def estimate_per_video(records: list[InputRecord], spec: ClipSpec, measure_bytes: bool = False) -> tuple[float, float]:
    """(mean clips per input, mean tar bytes per clip) over a few inputs spread over the list (failures
    count as 0 clips). Bytes are measured only when asked: it encodes the first clip of each probed input."""
    if not records:
        return 0.0, 0.0
    step = max(1, len(records) // PROBE_SAMPLE)
    sample = records[::step][:PROBE_SAMPLE]
    total = 0
    sizes: list[int] = []
    for r in sample:
        try:
            with open_video(r.path, spec) as (info, clips):
                total += spec.expected_clips(info.duration)
                if measure_bytes:
                    first = next(iter(clips), None)
                    if first is not None:
                        sizes.append(sample_bytes(len(first.mp4)))
        except VideoError:
            pass
        except Exception as e:  # a probe must never stop planning
            log.debug("probe of %s failed: %r", r.path, e)
    return total / len(sample), (sum(sizes) / len(sizes) if sizes else 0.0)


def make_plan(cfg: ShardConfig, records: list[InputRecord], duplicates: int, spec: ClipSpec) -> Plan:
    if cfg.limit:
        records = records[: cfg.limit]
    target_bytes = parse_bytes(cfg.shard_bytes)
    per_video, per_clip = estimate_per_video(
        records, spec, measure_bytes=bool(target_bytes) and not cfg.videos_per_shard
    )
    if cfg.videos_per_shard:
        vps = cfg.videos_per_shard
    elif target_bytes:
        # no clip measured (every probed input failed): fall back to one input per shard rather than guess
        per_input = per_video * per_clip
        vps = max(1, min(1_000_000, round(target_bytes / per_input))) if per_input > 0 else 1
        log.info(
            "--shard-bytes %s: %.0f bytes per clip x %.2f clips per input measured -> %d inputs per shard",
            cfg.shard_bytes,
            per_clip,
            per_video,
            vps,
        )
    else:
        vps = max(1, min(1_000_000, round(cfg.samples_per_shard / max(per_video, 1e-3))))
    return Plan(settings_of(cfg), vps, per_video, duplicates, records, per_clip)


def save_plan(out: Path, plan: Plan) -> None:
    # the input list first: a plan file always has its inputs beside it
    lines = b"".join(json.dumps(r.as_dict(), ensure_ascii=False).encode() + b"\n" for r in plan.inputs)
    atomic_write_bytes(out / INPUTS_FILE, lines)
    doc = {
        "settings": plan.settings,
        "videos_per_shard": plan.videos_per_shard,
        "clips_per_video": plan.clips_per_video,
        "bytes_per_clip": plan.bytes_per_clip,
        "duplicates": plan.duplicates,
        "inputs": len(plan.inputs),
        "shards": plan.num_shards,
        "inputs_sha256": hashlib.sha256(lines).hexdigest(),
        "created": time.time(),
    }
    atomic_write_bytes(out / PLAN_FILE, json.dumps(doc, indent=1).encode())


def load_plan(out: Path) -> Plan | None:
    p = out / PLAN_FILE
    if not p.exists():
        return None
    doc = json.loads(p.read_text())
    lines = (out / INPUTS_FILE).read_bytes()
    if hashlib.sha256(lines).hexdigest() != doc["inputs_sha256"]:
        raise PlanMismatch(f"{out / INPUTS_FILE} does not match {p}: the output directory was edited; use a new OUTPUT")
    inputs = [InputRecord(**json.loads(line)) for line in lines.splitlines() if line.strip()]
    return Plan(
        doc["settings"],
        doc["videos_per_shard"],
        doc["clips_per_video"],
        doc["duplicates"],
        inputs,
        doc.get("bytes_per_clip", 0.0),
    )


def check_settings(plan: Plan, cfg: ShardConfig) -> None:
    """A rerun must use the settings the shards were made with."""
    now = settings_of(cfg)
    diff = [
        f"--{k.replace('_', '-')}: {plan.settings.get(k)!r} -> {now[k]!r}"
        for k in OUTPUT_SETTINGS
        if k != "input" and k in plan.settings and plan.settings[k] != now[k]
    ]  # absent: made before the option existed
    if diff:
        raise PlanMismatch(
            "OUTPUT was made with other settings ("
            + "; ".join(diff)
            + "): rerun with the same options, or use a new OUTPUT"
        )

"""The fixed assignment of inputs to shards, made once per OUTPUT and reused by every rerun.

Inputs are listed in a stable order (sorted directory walk, or manifest order) and shard i gets inputs
[i * V, (i + 1) * V). V (videos per shard) is given or derived from --samples-per-shard and a probe of
a few inputs spread over the list. The list and V are saved (`_inputs.jsonl`, `_plan.json`), so a
rerun produces the same shards even if the directory changed meanwhile, and a shard's content never
depends on timing: that is what makes "rerun after kill -9 gives every clip exactly once" hold.
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

from vldm.config.data import ShardConfig
from vldm.data.clips import ClipSpec, VideoError, open_video
from vldm.data.format import INPUTS_FILE, PLAN_FILE, shard_name
from vldm.data.fsutil import atomic_write
from vldm.data.sources import InputRecord

log = logging.getLogger("vldm.data")

# options that change what is written; the others (workers, logging, ...) may differ between reruns
OUTPUT_SETTINGS = ("input", "frames", "fps", "size", "clip_stride", "max_clips", "spread", "cut_threshold", "min_fps",
                   "crf", "preset", "samples_per_shard", "videos_per_shard", "prefix", "source_hash", "extensions", "limit")
PROBE_SAMPLE = 24


class PlanMismatch(ValueError):
    pass


@dataclass
class Plan:
    settings: dict[str, Any]
    videos_per_shard: int
    clips_per_video: float  # estimate, for the ETA
    duplicates: int
    inputs: list[InputRecord]

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


def estimate_clips_per_video(records: list[InputRecord], spec: ClipSpec) -> float:
    """Mean clips per input over a few inputs spread over the list (failures count as 0)."""
    if not records:
        return 0.0
    step = max(1, len(records) // PROBE_SAMPLE)
    sample = records[::step][:PROBE_SAMPLE]
    total = 0
    for r in sample:
        try:
            with open_video(r.path, spec) as (info, _):
                total += spec.expected_clips(info.duration)
        except VideoError:
            pass
        except Exception as e:  # a probe must never stop planning
            log.debug("probe of %s failed: %r", r.path, e)
    return total / len(sample)


def make_plan(cfg: ShardConfig, records: list[InputRecord], duplicates: int, spec: ClipSpec) -> Plan:
    if cfg.limit:
        records = records[: cfg.limit]
    per_video = estimate_clips_per_video(records, spec)
    vps = cfg.videos_per_shard or max(1, min(1_000_000, round(cfg.samples_per_shard / max(per_video, 1e-3))))
    return Plan(settings_of(cfg), vps, per_video, duplicates, records)


def save_plan(out: Path, plan: Plan) -> None:
    # the input list first: a plan file always has its inputs beside it
    lines = b"".join(json.dumps(r.as_dict(), ensure_ascii=False).encode() + b"\n" for r in plan.inputs)
    atomic_write(out / INPUTS_FILE, lines)
    doc = {"settings": plan.settings, "videos_per_shard": plan.videos_per_shard, "clips_per_video": plan.clips_per_video,
           "duplicates": plan.duplicates, "inputs": len(plan.inputs), "shards": plan.num_shards,
           "inputs_sha256": hashlib.sha256(lines).hexdigest(), "created": time.time()}
    atomic_write(out / PLAN_FILE, json.dumps(doc, indent=1).encode())


def load_plan(out: Path) -> Plan | None:
    p = out / PLAN_FILE
    if not p.exists():
        return None
    doc = json.loads(p.read_text())
    lines = (out / INPUTS_FILE).read_bytes()
    if hashlib.sha256(lines).hexdigest() != doc["inputs_sha256"]:
        raise PlanMismatch(f"{out / INPUTS_FILE} does not match {p}: the output directory was edited; use a new OUTPUT")
    inputs = [InputRecord(**json.loads(line)) for line in lines.splitlines() if line.strip()]
    return Plan(doc["settings"], doc["videos_per_shard"], doc["clips_per_video"], doc["duplicates"], inputs)


def check_settings(plan: Plan, cfg: ShardConfig) -> None:
    """A rerun must use the settings the shards were made with."""
    now = settings_of(cfg)
    diff = [f"--{k.replace('_', '-')}: {plan.settings.get(k)!r} -> {now[k]!r}" for k in OUTPUT_SETTINGS
            if k != "input" and plan.settings.get(k) != now[k]]
    if diff:
        raise PlanMismatch("OUTPUT was made with other settings (" + "; ".join(diff) + "): rerun with the same options, or use a new OUTPUT")

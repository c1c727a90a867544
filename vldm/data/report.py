"""Run-level outputs, always rebuilt from the per-shard done markers (so they stay exact across reruns
and kills): `_stats.json`, `failed.jsonl`, `rejected.jsonl` and the loader's index `_shards.json` (one per
bucket directory too, with buckets).

    python -m vldm.data.report OUTPUT [--png PATH]

prints what a run did, stage by stage with reasons, and writes a PNG with the score histograms and a
contact sheet of clips per bucket (vldm.data.curate.summary).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from vldm.data.curate.buckets import parse_buckets
from vldm.data.curate.filters import BORDER_EDGES, MOTION_EDGES, SHOT_EDGES
from vldm.data.format import FAILED_FILE, FORMAT_VERSION, INDEX_FILE, REJECTED_FILE, SHARD_SUFFIX, STATS_FILE
from vldm.data.plan import Plan
from vldm.data.shards import read_done
from vldm.io import atomic_write_bytes


def aggregate(out: Path, plan: Plan, run: dict[str, Any]) -> dict[str, Any]:
    """Write _stats.json, failed.jsonl and _shards.json; return the stats.

    `run`: this run's run_id, elapsed (s), shards_skipped and shard errors, for the run section."""
    names = [plan.shard_name(i) for i in range(plan.num_shards)]
    done = {n: read_done(out, n) for n in names}
    complete = [d for d in done.values() if d]
    failed = [row for d in complete for row in d["failed"]]
    reasons = Counter(row["reason"] for row in failed)
    this_run = [d for d in complete if d.get("run") == run["run_id"]]
    clips_run = sum(d["samples"] for d in this_run)
    elapsed = max(run["elapsed"], 1e-9)
    stats = {
        "format_version": FORMAT_VERSION,
        "inputs": {
            "seen": len(plan.inputs) + plan.duplicates,
            "duplicates": plan.duplicates,
            "unique": len(plan.inputs),
            "processed": sum(d["inputs"] for d in complete),
            "ok": sum(d["ok"] for d in complete),
            "failed": len(failed),
            "failed_by_reason": dict(sorted(reasons.items())),
            "partial": sum(len(d["partial"]) for d in complete),
        },
        "clips": sum(d["samples"] for d in complete),
        "seconds": round(sum(d["seconds"] for d in complete), 3),
        "bytes": sum(d["bytes"] for d in complete),
        "source_bytes": sum(d["source_bytes"] for d in complete),
        "shards": {
            "total": len(names),
            "complete": len(complete),
            "with_latents": sum(1 for d in complete if _has_latents(out, d)),
            "incomplete": [n for n, d in done.items() if not d],
        },
        "worker_seconds": round(sum(d["elapsed"] for d in complete), 3),
        "worker_cpu_seconds": round(sum(d.get("cpu_s", 0.0) for d in complete), 3),
        "run": {
            "run_id": run["run_id"],
            "elapsed": round(run["elapsed"], 3),
            "ray_startup_s": round(run.get("ray_startup_s", 0.0), 3),
            "shards_written": len(this_run),
            "shards_skipped": run.get("shards_skipped", 0),
            "shard_errors": run.get("errors", {}),
            "clips": clips_run,
            "clips_per_s": round(clips_run / elapsed, 3),
            "source_mb_per_s": round(sum(d["source_bytes"] for d in this_run) / 1e6 / elapsed, 3),
            "workers": run.get("workers"),
        },
        "settings": plan.settings,
        "videos_per_shard": plan.videos_per_shard,
        # how close the up-front assignment came to --shard-bytes / --samples-per-shard (the last shard is
        # left out of min: it holds the remainder)
        "shard_size": _spread(
            [d["bytes"] for d in complete],
            [d["samples"] for d in complete],
            [n == names[-1] for n, d in done.items() if d] if names else [],
        ),
        "bytes_per_clip_estimate": round(plan.bytes_per_clip),
    }
    rejected = [row for d in complete for row in d.get("rejected", [])]
    stats["curation"] = _curation(complete, rejected, stats["clips"])
    buckets = parse_buckets(plan.settings.get("buckets") or "")
    index: dict[str, Any] = {"format_version": FORMAT_VERSION}
    if buckets:
        shards, per_bucket = _bucket_indexes(out, names, done, buckets)
        index["buckets"] = {b.name: {"height": b.height, "width": b.width, "frames": b.frames} for b in buckets}
        index["shards"] = shards
        stats["buckets"] = per_bucket
    else:
        index["shards"] = [
            {"name": n + SHARD_SUFFIX, "samples": d["samples"], "bytes": d["bytes"], "latents": bool(d.get("latents"))}
            for n, d in done.items()
            if d
        ]
    atomic_write_bytes(out / STATS_FILE, json.dumps(stats, indent=1, ensure_ascii=False).encode())
    atomic_write_bytes(out / FAILED_FILE, _jsonl(failed))
    atomic_write_bytes(out / REJECTED_FILE, _jsonl(rejected))
    atomic_write_bytes(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    return stats


def _has_latents(out: Path, summary: dict[str, Any]) -> bool:
    if "buckets" not in summary:
        return bool(summary.get("latents"))
    parts = [read_done(out / b, summary["name"]) for b in summary["buckets"]]
    return bool(parts) and all(p and p.get("latents") for p in parts)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def _curation(complete: list[dict[str, Any]], rejected: list[dict[str, Any]], kept: int) -> dict[str, Any]:
    """Shot and filter counts, and score histograms (bin edges given), summed over the shards."""
    cur = [d.get("curation") or {} for d in complete]

    def hist(name: str, edges: tuple[float, ...]) -> dict[str, Any]:
        counts = [0] * (len(edges) - 1)
        for c in cur:
            for i, v in enumerate((c.get("histograms") or {}).get(name, [])):
                counts[i] += v
        return {"edges": list(edges), "counts": counts}

    detectors = sorted({c.get("shot_detector", "none") for c in cur}) or ["none"]
    return {
        "shot_detector": detectors[0] if len(detectors) == 1 else detectors,
        "cuts": sum(c.get("cuts", 0) for c in cur),
        "shots": sum(c.get("shots", 0) for c in cur),
        "clips_cut": sum(c.get("clips_scored", 0) for c in cur),
        "clips_kept": kept,
        "clips_rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "histograms": {
            "motion": hist("motion", MOTION_EDGES),
            "borders": hist("borders", BORDER_EDGES),
            "shot_seconds": hist("shot_seconds", SHOT_EDGES),
        },
    }


def _bucket_indexes(
    out: Path, names: list[str], done: dict[str, dict[str, Any] | None], buckets: tuple
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each bucket directory's own _shards.json (a flat layout the loader reads as it is), and the top-level
    shard list with names relative to OUTPUT."""
    top: list[dict[str, Any]] = []
    per_bucket: dict[str, Any] = {}
    for b in buckets:
        rows = []
        for n in names:
            d = done.get(n)
            if not d or b.name not in d.get("buckets", {}):
                continue
            part = read_done(out / b.name, n) or {}
            rows.append(
                {
                    "name": n + SHARD_SUFFIX,
                    "samples": part.get("samples", 0),
                    "bytes": part.get("bytes", 0),
                    "latents": bool(part.get("latents")),
                }
            )
        # every bucket has its directory and index, also one no clip went to
        (out / b.name).mkdir(exist_ok=True)
        index = {"format_version": FORMAT_VERSION, "shards": rows}
        atomic_write_bytes(out / b.name / INDEX_FILE, json.dumps(index, indent=1).encode())
        top += [{**r, "name": f"{b.name}/{r['name']}", "bucket": b.name} for r in rows]
        per_bucket[b.name] = {
            "clips": sum(r["samples"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "shards": len(rows),
        }
    return top, per_bucket


def _spread(sizes: list[int], samples: list[int], is_last: list[bool]) -> dict[str, Any]:
    full = [b for b, last in zip(sizes, is_last) if not last] or sizes
    full_n = [n for n, last in zip(samples, is_last) if not last] or samples
    if not sizes:
        return {}
    return {
        "bytes_min": min(full),
        "bytes_mean": round(sum(sizes) / len(sizes)),
        "bytes_max": max(sizes),
        "samples_min": min(full_n),
        "samples_mean": round(sum(samples) / len(samples), 2),
        "samples_max": max(samples),
    }


if __name__ == "__main__":
    import sys

    from vldm.data.curate.summary import main

    sys.exit(main())

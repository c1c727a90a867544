"""Run-level outputs, always rebuilt from the per-shard done markers (so they stay exact across reruns
and kills): `_stats.json`, `failed.jsonl` and the loader's index `_shards.json`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from vldm.data.format import FAILED_FILE, FORMAT_VERSION, INDEX_FILE, SHARD_SUFFIX, STATS_FILE
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
            "with_latents": sum(1 for d in complete if d.get("latents")),
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
    atomic_write_bytes(out / STATS_FILE, json.dumps(stats, indent=1, ensure_ascii=False).encode())
    atomic_write_bytes(out / FAILED_FILE, b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in failed))
    index = {
        "format_version": FORMAT_VERSION,
        "shards": [
            {"name": n + SHARD_SUFFIX, "samples": d["samples"], "bytes": d["bytes"], "latents": bool(d.get("latents"))}
            for n, d in done.items()
            if d
        ],
    }
    atomic_write_bytes(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    return stats


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

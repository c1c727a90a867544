"""Merging shard partials into reference statistics and into one result per checkpoint.

Metric names carry the sample counts they were measured at (Frechet distances are biased at small N
and only comparable at equal N): `ema/fvd_fake2048_real2048`, `ema/fid_fake32768_real10000` (frames),
`ema/clipsim`, `ema/flicker`, `ema/consistency`, `ema/val_loss`, `ema/val_loss_t500`.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from vldm.config.eval import EvalSuite
from vldm.eval.frechet import FeatureStats, frechet_from_stats
from vldm.eval.layout import ERROR, RESULT, VIDEOS, step_dir
from vldm.eval.suite import Resolved, sample_spec
from vldm.eval.tasks import ShardTask, read_partial
from vldm.io import atomic_path, atomic_write_text

REF_STATS = "stats.npz"
LISTED_VIDEOS = 16
REF_META = "meta.json"


def _stats(arr: np.ndarray) -> FeatureStats | None:
    return FeatureStats.from_bytes(arr.tobytes()) if arr.size else None


def _merge(parts: list[FeatureStats | None]) -> FeatureStats | None:
    out = None
    for p in parts:
        if p is not None:
            out = p if out is None else out.merge(p)
    return out


# ------------------------------------------------------------------ reference statistics
def load_reference(cache_dir: Path, key: str) -> tuple[FeatureStats, dict] | None:
    d = cache_dir / key
    if not (d / REF_STATS).exists() or not (d / REF_META).exists():
        return None
    return FeatureStats.load(d / REF_STATS), json.loads((d / REF_META).read_text())


def finalize_reference(cache_dir: Path, key: str, tasks: list[ShardTask]) -> tuple[FeatureStats, dict]:
    """Merge a reference's shard partials into `<cache>/<key>/stats.npz` + `meta.json`."""
    stats, skipped, extractor = [], [], {}
    for t in sorted(tasks, key=lambda t: t.start):
        meta, arrays = read_partial(t.out)
        stats.append(_stats(arrays["stats"]))
        skipped.extend(meta.get("skipped", []))
        extractor = meta.get("extractor", extractor)
    merged = _merge(stats)
    if merged is None or merged.count < 2:
        raise ValueError(f"reference {key}: fewer than 2 readable real videos ({len(skipped)} skipped): {skipped[:3]}")
    meta = {
        "key": key,
        "metric": tasks[0].metric,
        "n": merged.count,
        "skipped": skipped,
        "extractor": extractor,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    merged.save(cache_dir / key / REF_STATS)  # stats before meta: meta.json marks the entry complete
    atomic_write_text(cache_dir / key / REF_META, json.dumps(meta, indent=2))
    return merged, meta


# ------------------------------------------------------------------ one checkpoint
def first_frame_grid(frames: np.ndarray, cols: int = 4) -> np.ndarray:
    """(n, h, w, 3) uint8 -> one (rows*h, cols*w, 3) image."""
    n, h, w, c = frames.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, fr in enumerate(frames):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = fr
    return grid


def _save_png(path: Path, image: np.ndarray) -> str | None:
    try:
        from PIL import Image
    except ImportError:  # pillow is optional (it comes with wandb/moviepy)
        return None
    with atomic_path(path) as tmp:  # `.NAME.*.tmp.png`: PIL picks the format from the extension
        Image.fromarray(image).save(tmp)
    return path.name


def _frechet(name: str, fake: FeatureStats, ref: tuple[FeatureStats, dict], unit: str) -> tuple[float, dict]:
    real, meta = ref
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = frechet_from_stats(fake, real, name)
    info = {
        "n_fake": fake.count,
        "n_real": real.count,
        "unit": unit,
        "real_skipped": len(meta.get("skipped", [])),
        "extractor": meta.get("extractor", {}),
        "warnings": [str(w.message) for w in caught],
    }
    return value, info


def finalize_checkpoint(
    run_dir: Path,
    suite: EvalSuite,
    suite_hash: str,
    proto: dict,
    resolved: Resolved,
    ckpt: Path,
    step: int,
    tasks: list[ShardTask],
    references: dict[str, tuple[FeatureStats, dict]],
    prompt_list: list[str],
) -> dict:
    """Merge every partial of one checkpoint and write `result.json` (atomically). Returns the result."""
    sdir = step_dir(run_dir, suite_hash, ckpt.name)
    metrics: dict[str, float] = {}
    details: dict[str, dict] = {}
    videos: dict[str, list[dict]] = {}
    grids: dict[str, str] = {}
    wall = 0.0
    hosts: set[str] = set()
    for variant in sorted({t.variant for t in tasks}):
        vt = sorted((t for t in tasks if t.variant == variant), key=lambda t: (t.kind, t.start))
        parts = {"samples": [], "val_loss": []}
        for t in vt:
            meta, arrays = read_partial(t.out)
            wall += meta.get("wall_s", 0.0)
            hosts.add(f"{meta.get('host')}:{meta.get('device')}")
            parts[t.kind].append((meta, arrays))
        samples = [a for _, a in parts["samples"]]
        for k in ("flicker", "consistency", "clipsim"):
            vals = [a[k] for a in samples if k in a]
            if vals:
                v = np.concatenate(vals)
                metrics[f"{variant}/{k}"] = float(v.mean())
                details[f"{variant}/{k}"] = {"n": int(v.size), "std": float(v.std())}
        for metric, unit in (("fvd", "videos"), ("fid", "frames")):
            fake = _merge([_stats(a[f"{metric}_stats"]) for a in samples if f"{metric}_stats" in a])
            if fake is None:
                continue
            value, info = _frechet(f"{metric.upper()} {variant} step {step}", fake, references[metric], unit)
            info["extractor_fake"] = next(
                (m.get("i3d_protocol" if metric == "fvd" else "inception_protocol") for m, _ in parts["samples"]), {}
            )
            name = f"{variant}/{metric}_fake{info['n_fake']}_real{info['n_real']}"
            metrics[name] = value
            details[name] = info
        if parts["val_loss"]:
            losses = np.concatenate([a["val_loss"] for _, a in parts["val_loss"]])  # (clips, timesteps)
            metrics[f"{variant}/val_loss"] = float(losses.mean())
            details[f"{variant}/val_loss"] = {
                "n_clips": int(losses.shape[0]),
                "timesteps": list(suite.val_loss.timesteps),
            }
            for j, t in enumerate(suite.val_loss.timesteps):
                metrics[f"{variant}/val_loss_t{t}"] = float(losses[:, j].mean())
        vdir = sdir / VIDEOS / variant
        # the first few samples by name (W&B logs them); sample i is always videos/<variant>/<i:06d>.mp4
        # with prompt i % len(prompts) and seed sample_seed(seed, i), so the rest need no listing
        listed = max(suite.wandb.log_videos, LISTED_VIDEOS)
        videos[variant] = [
            {**sample_spec(suite, i, prompt_list), "path": f"{VIDEOS}/{variant}/{i:06d}.mp4"}
            for i in range(min(listed, suite.sampling.num_samples))
            if (vdir / f"{i:06d}.mp4").exists()
        ]
        firsts = [a["first_frames"] for a in samples if "first_frames" in a]
        if firsts:
            png = _save_png(sdir / f"first_frames_{variant}.png", first_frame_grid(np.concatenate(firsts)))
            if png:
                grids[variant] = png
    result = {
        "step": step,
        "checkpoint": str(ckpt),
        "suite": suite.name,
        "suite_hash": suite_hash,
        "metrics": metrics,
        "details": details,
        "resolved": resolved.as_dict(),
        "videos": videos,
        "first_frame_grids": grids,
        "protocol": proto,
        "shard_wall_s": wall,
        "workers": sorted(hosts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(sdir / RESULT, json.dumps(result, indent=2, default=float))
    (sdir / ERROR).unlink(missing_ok=True)
    return result


def write_error(
    run_dir: Path, suite_hash: str, ckpt_name: str, step: int, task: str, error: str, attempts: int
) -> None:
    atomic_write_text(
        step_dir(run_dir, suite_hash, ckpt_name) / ERROR,
        json.dumps(
            {
                "step": step,
                "task": task,
                "attempts": attempts,
                "error": error,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        ),
    )


def read_results(run_dir: str | Path) -> dict[str, list[dict]]:
    """{suite_hash: [result, ...] sorted by step} for every suite evaluated in a run."""
    out: dict[str, list[dict]] = {}
    root = Path(run_dir) / "eval"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        rs = []
        for f in d.glob(f"step_*/{RESULT}"):
            try:
                rs.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # written atomically, so only a foreign file can be unreadable
        if rs:
            out[d.name] = sorted(rs, key=lambda r: r["step"])
    return out

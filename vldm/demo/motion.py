"""The motion metric of the synthetic domain, computed from decoded videos alone (issue 7).

A moving-shapes video is a plain background with a solid shape that moves at constant velocity
(bouncing off the borders). Per frame, the pixels far from the background colour are the shape; their
centroid is its position. Two numbers separate a video model from an image model run frame by frame:

- acceleration: |c[t+1] - 2 c[t] + c[t-1]| with c in frame units (x / width, y / height). Constant
  velocity gives ~0 (a bounce gives one spike: hence the median); a shape placed at random in every
  frame gives a large value (~0.5 for a shape anywhere in the frame).
- stable presence: the fraction of frames where a shape is present (enough foreground pixels) with an
  area within `area_tol` of the video's median area. A shape that fades, splits or changes size fails.

Speed (|c[t+1] - c[t]|) is reported too: a static shape also has zero acceleration, and speed tells
"coherent and moving" from "coherent and frozen". Flicker (mean |frame[t+1] - frame[t]|, 0-255) needs no
tracking at all: frames drawn independently differ everywhere a shape was or is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class MotionStats:
    """Motion figures of a set of videos (None where nothing could be measured)."""

    accel_median: float | None  # median over all frame triples with a shape in each frame
    accel_mean: float | None
    speed_median: float | None  # median |c[t+1] - c[t]| over frame pairs with a shape in both
    stable_presence: float  # fraction of frames with a shape of stable area
    presence: float  # fraction of frames with any shape
    flicker: float | None  # mean |frame[t+1] - frame[t]| on the 0-255 scale
    num_videos: int
    num_triples: int

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def background_colour(video: np.ndarray) -> np.ndarray:
    """Per-channel median over every pixel of every frame: the background covers most of the frame.

    Foreground = largest channel difference to it above `threshold` (uint8 scale): the palette's darkest
    colour differs from black by 190, so 64 is far from both codec noise and the shapes."""
    return np.median(video.reshape(-1, video.shape[-1]).astype(np.float32), axis=0)


def centroids(video: np.ndarray, threshold: float = 64.0, min_area: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """(F, 2) centroids (x / W, y / H; NaN where no shape) and (F,) foreground areas (fraction of the frame).

    A frame has a shape when at least `min_area` of its pixels are foreground. The centroid weighs each
    pixel by its distance to the background relative to the shape's own (anti-aliased edges count
    fractionally): a binary mask moves in whole pixels and adds ~0.01 of jitter to constant motion.
    """
    f, h, w = video.shape[:3]
    dist = np.abs(video.astype(np.float32) - background_colour(video)).max(axis=-1)
    masks = dist > threshold
    area = masks.reshape(f, -1).mean(axis=1)
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    cent = np.full((f, 2), np.nan)
    for i in range(f):
        if area[i] >= min_area:
            peak = np.percentile(dist[i][masks[i]], 90)  # the shape's distance to the background
            wt = np.clip(dist[i] / peak, 0, 1) * (dist[i] > threshold / 4)
            cent[i] = (wt.sum(0) * xs).sum() / wt.sum(), (wt.sum(1) * ys).sum() / wt.sum()
    return cent, area


def video_motion(video: np.ndarray, threshold: float = 64.0, min_area: float = 0.005, area_tol: float = 0.35) -> dict:
    """Per-video arrays: accelerations and speeds (frame units) and the per-frame stable-presence flags."""
    cent, area = centroids(video, threshold, min_area)
    present = ~np.isnan(cent[:, 0])
    accel = np.linalg.norm(cent[2:] - 2 * cent[1:-1] + cent[:-2], axis=1)
    speed = np.linalg.norm(cent[1:] - cent[:-1], axis=1)
    med = float(np.median(area[present])) if present.any() else 0.0
    stable = present & (np.abs(area - med) <= area_tol * med)
    return {"accel": accel[~np.isnan(accel)], "speed": speed[~np.isnan(speed)], "stable": stable, "present": present}


def motion_stats(videos: list[np.ndarray] | np.ndarray, **kw: float) -> MotionStats:
    """Motion figures of videos given as (F, H, W, 3) uint8 arrays (RGB)."""
    per = [video_motion(np.asarray(v), **kw) for v in videos]
    accel = np.concatenate([p["accel"] for p in per]) if per else np.zeros(0)
    speed = np.concatenate([p["speed"] for p in per]) if per else np.zeros(0)
    stable = np.concatenate([p["stable"] for p in per]) if per else np.zeros(0, bool)
    diffs = [np.abs(np.diff(np.asarray(v, np.float32), axis=0)).mean() for v in videos if len(v) > 1]
    present = np.concatenate([p["present"] for p in per]) if per else np.zeros(0, bool)

    def stat(a: np.ndarray, fn) -> float | None:
        return float(fn(a)) if a.size else None

    return MotionStats(
        accel_median=stat(accel, np.median),
        accel_mean=stat(accel, np.mean),
        speed_median=stat(speed, np.median),
        stable_presence=float(stable.mean()) if stable.size else 0.0,
        presence=float(present.mean()) if present.size else 0.0,
        flicker=float(np.mean(diffs)) if diffs else None,
        num_videos=len(per),
        num_triples=int(accel.size),
    )


def closeness(model: MotionStats, real: MotionStats) -> float:
    """|model accel - real accel|: how far a model's motion is from the real clips' (inf if unmeasurable)."""
    if model.accel_median is None or real.accel_median is None:
        return math.inf
    return abs(model.accel_median - real.accel_median)

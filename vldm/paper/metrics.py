"""Metrics of generated videos against the synthetic domain's ground truth (issue 13).

A moving-shapes clip is a known plain background with one solid shape. Segmenting the shape against
that background (largest channel difference above `threshold` on the uint8 scale) gives, per frame, its
mean colour, its area and its centroid; everything below is computed from those and from pixels:

- identity drift: how much the shape's mean colour (RGB distance / 255) and area (relative to the
  video's median area) move within one video. A real clip keeps both constant (~0); a shape that changes
  colour or kind half-way scores ~half the distance between the two colours / areas.
- trajectory error: distance (frame units: x / W, y / H) of the generated centroids from the centroids
  of the true continuation, measured the same way on the real clip (a triangle's area centroid is not
  its bounding-box centre: comparing centroid with centroid cancels that). A frame with no shape
  counts as MISSING_ERROR, so a model cannot lower its error by drawing nothing.
- mask IoU against the true frame: where the shape is and what it looks like (a centroid cannot see
  two half-shapes whose mean position is right, as a cross-fade draws them).
- acceleration |c[t+1] - 2 c[t] + c[t-1]| (motion smoothness; constant velocity gives ~0).
- flicker (mean |x[t+1] - x[t]|) and temporal-difference error (mean |(x[t+1] - x[t]) - (y[t+1] - y[t])|
  against the reference video y), both on the 0-255 scale, and PSNR (dB) against the reference.

Videos are (F, H, W, 3) uint8 RGB arrays. Only numpy: the metrics run wherever the videos are.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLD = 64.0  # the palette's darkest colour is >= 190 away from every background: far above codec noise
MIN_AREA = 0.005  # a frame has a shape when at least this fraction of its pixels is foreground
MISSING_ERROR = 0.5  # trajectory error of a frame without a shape: a shape placed at random (frame units)


def _u8(video) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video of shape (F, H, W, 3), got {v.shape}")
    return v


def background_of(video: np.ndarray, background=None) -> np.ndarray:
    """The known background colour if given (the sidecar's background_rgb), else the per-channel median
    over every pixel (the background covers most of the frame)."""
    if background is not None:
        return np.asarray(background, np.float32).reshape(3)
    return np.median(video.reshape(-1, 3).astype(np.float32), axis=0)


def segment(video, background=None, threshold: float = THRESHOLD) -> np.ndarray:
    """(F, H, W) bool: the pixels far from the background colour (the shape)."""
    v = _u8(video)
    return np.abs(v.astype(np.float32) - background_of(v, background)).max(axis=-1) > threshold


def shape_features(video, background=None, threshold: float = THRESHOLD, min_area: float = MIN_AREA) -> dict:
    """Per frame: mean colour of the shape's pixels (F, 3; NaN where no shape), area (F,; fraction of the
    frame), centroid (F, 2; x / W, y / H, NaN where no shape) and presence (F,) bool."""
    v = _u8(video)
    f, h, w = v.shape[:3]
    dist = np.abs(v.astype(np.float32) - background_of(v, background)).max(axis=-1)
    masks = dist > threshold
    area = masks.reshape(f, -1).mean(axis=1)
    present = area >= min_area
    colour = np.full((f, 3), np.nan)
    cent = np.full((f, 2), np.nan)
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    for i in np.flatnonzero(present):
        m = masks[i]
        # the median pixel: anti-aliased and chroma-subsampled edges pull a mean towards the background
        colour[i] = np.median(v[i][m].astype(np.float64), axis=0)
        # anti-aliased edge pixels count by their distance to the background relative to the shape's own:
        # a binary mask moves in whole pixels and adds ~0.01 of jitter to constant motion
        peak = np.percentile(dist[i][m], 90)
        wt = np.clip(dist[i] / peak, 0, 1) * (dist[i] > threshold / 4)
        cent[i] = (wt.sum(0) * xs).sum() / wt.sum(), (wt.sum(1) * ys).sum() / wt.sum()
    return {"colour": colour, "area": area, "centroid": cent, "present": present}


def identity_drift(video, background=None, **kw) -> dict:
    """Per-video drift of the shape's identity: colour = mean over frames of |colour[t] - median colour|
    (RGB Euclidean / 255), area = mean |area[t] - median area| / median area, over the frames with a
    shape; presence = fraction of frames with a shape. None where no frame has a shape."""
    s = shape_features(video, background, **kw)
    p = s["present"]
    if not p.any():
        return {"colour": None, "area": None, "presence": 0.0}
    col = s["colour"][p]
    med_c = np.median(col, axis=0)
    area = s["area"][p]
    med_a = float(np.median(area))
    return {
        "colour": float(np.linalg.norm(col - med_c, axis=1).mean() / 255.0),
        "area": float(np.abs(area - med_a).mean() / med_a),
        "presence": float(p.mean()),
    }


def trajectory_error(video, reference, background=None, **kw) -> float:
    """Mean distance (frame units) between the centroids of `video` and of the true continuation
    `reference` (same frames, same size), over the frames where the reference has a shape; a generated
    frame without a shape counts MISSING_ERROR."""
    a, b = _u8(video), _u8(reference)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    ca = shape_features(a, background, **kw)["centroid"]
    cb = shape_features(b, background, **kw)["centroid"]
    ok = ~np.isnan(cb[:, 0])
    if not ok.any():
        raise ValueError("the reference has no shape in any frame: nothing to compare against")
    d = np.linalg.norm(ca[ok] - cb[ok], axis=1)
    return float(np.where(np.isnan(d), MISSING_ERROR, d).mean())


def mask_iou(video, reference, background=None, threshold: float = THRESHOLD) -> float:
    """Mean over frames of the intersection over union of the shape masks of `video` and `reference`
    (1 = the shape drawn exactly where and as it is; frames where neither has a shape count 1). Unlike a
    centroid, it sees ghosts: a cross-fade's two half-shapes have the right mean position but IoU ~0."""
    a, b = segment(video, background, threshold), segment(reference, background, threshold)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def accelerations(video, background=None, **kw) -> np.ndarray:
    """|c[t+1] - 2 c[t] + c[t-1]| over the frame triples with a shape in all three (frame units)."""
    c = shape_features(video, background, **kw)["centroid"]
    acc = np.linalg.norm(c[2:] - 2 * c[1:-1] + c[:-2], axis=1)
    return acc[~np.isnan(acc)]


def flicker(video) -> float:
    """Mean |x[t+1] - x[t]| on the 0-255 scale."""
    v = _u8(video).astype(np.float32)
    return float(np.abs(np.diff(v, axis=0)).mean()) if len(v) > 1 else 0.0


def temporal_difference_error(video, reference) -> float:
    """Mean |(x[t+1] - x[t]) - (y[t+1] - y[t])| (0-255): flicker that the reference does not have."""
    a, b = _u8(video).astype(np.float32), _u8(reference).astype(np.float32)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    return float(np.abs(np.diff(a, axis=0) - np.diff(b, axis=0)).mean()) if len(a) > 1 else 0.0


def psnr(video, reference) -> float:
    """PSNR in dB of uint8 videos (inf when identical)."""
    a, b = _u8(video).astype(np.float64), _u8(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def median(values) -> float | None:
    """Median of the finite values (None when there are none): the summaries' aggregate over videos."""
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    return float(np.median(a)) if a.size else None


def identity_summary(videos, backgrounds=None) -> dict:
    """Median per-video colour and area drift (and mean presence) of a set of videos."""
    bgs = backgrounds if backgrounds is not None else [None] * len(videos)
    per = [identity_drift(v, b) for v, b in zip(videos, bgs)]
    return {
        "colour_drift": median(p["colour"] for p in per),
        "area_drift": median(p["area"] for p in per),
        "presence": float(np.mean([p["presence"] for p in per])) if per else 0.0,
        "num_videos": len(per),
    }


def motion_summary(videos, backgrounds=None) -> dict:
    """Median acceleration over all frame triples and mean flicker of a set of videos."""
    bgs = backgrounds if backgrounds is not None else [None] * len(videos)
    acc = [accelerations(v, b) for v, b in zip(videos, bgs)]
    allacc = np.concatenate(acc) if acc else np.zeros(0)
    return {
        "accel": float(np.median(allacc)) if allacc.size else None,
        "flicker": float(np.mean([flicker(v) for v in videos])) if len(videos) else None,
        "num_triples": int(allacc.size),
    }


def colour_fraction(video, target, palette, background=None, **kw) -> float:
    """Fraction of the frames whose shape's median colour is nearer (RGB) to `target` than to any other
    colour of `palette` (a name -> RGB dict that holds the target's value too, or not); a frame without a
    shape counts as not the target: a model cannot show a concept by drawing nothing."""
    s = shape_features(video, background, **kw)
    target = np.asarray(target, np.float64)
    others = np.asarray([c for c in palette.values() if not np.array_equal(np.asarray(c), target)], np.float64)
    hit = 0
    for col, here in zip(s["colour"], s["present"]):
        if here and np.linalg.norm(col - target) < np.linalg.norm(others - col, axis=1).min():
            hit += 1
    return hit / len(s["present"]) if len(s["present"]) else 0.0


def shape_area(videos, backgrounds=None) -> float | None:
    """Median over the videos of the median fraction of the frame the shape covers (frames with a shape)."""
    bgs = backgrounds if backgrounds is not None else [None] * len(videos)
    per = []
    for v, b in zip(videos, bgs):
        s = shape_features(v, b)
        per.append(float(np.median(s["area"][s["present"]])) if s["present"].any() else None)
    return median(per)

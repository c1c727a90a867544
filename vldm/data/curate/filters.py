"""Clip and source filters that write their scores: motion (static / jittery clips) and black borders.

Motion score: frame-difference energy at low resolution, the mean over consecutive frames of the clip (at the
clip's --fps) of the mean absolute difference of grey thumbnails (about 32 px on the short side, values 0-1).
Codec noise on a frozen picture gives ~0.001; ordinary camera footage 0.01-0.1; a hard cut ~0.1-0.4 for that
one pair. It is the same measure the threshold shot detector uses for a single pair of frames, so the scales
agree. Camera motion counts as motion (this is not optical flow): a pan over a still scene is not "static".

Borders: letterbox / pillarbox bars found on a few frames spread over the source (read by seeking, before the
clips are cut): a row or column from an edge inwards is a border while its mean luma stays below
--border-black in every sampled frame. With --borders crop the clips are cut from the picture inside them,
with --borders reject such a source is rejected (reason `borders`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

THUMB = 32  # thumbnail short side for motion and threshold cuts
BORDER_SAMPLES = 5  # frames sampled for border detection, at 10%, 30%, ... 90% of the duration
BORDER_WIDTH = 640  # border detection works on frames at most this wide (exact enough: a pixel at 640 px)


def thumb(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> grey thumbnail, float32 0-1, short side about THUMB (strided: cheap, and the mean over
    a thumbnail is robust to codec noise)."""
    s = max(1, min(img.shape[0], img.shape[1]) // THUMB)
    return img[::s, ::s].mean(axis=2, dtype=np.float32) / 255.0


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| of two thumbnails (0-1)."""
    return float(np.abs(a - b).mean())


def motion_score(thumbs: list[np.ndarray]) -> float:
    """Mean frame difference over consecutive thumbnails of a clip."""
    if len(thumbs) < 2:
        return 0.0
    return float(np.mean([frame_difference(a, b) for a, b in zip(thumbs, thumbs[1:])]))


def motion_verdict(score: float, static: float, jitter: float) -> str | None:
    """'static' below `static`, 'jitter' above `jitter` (0 = that check off), else None."""
    if static and score < static:
        return "static"
    if jitter and score > jitter:
        return "jitter"
    return None


@dataclass(frozen=True)
class Borders:
    """Black bars as fractions of the displayed picture: top, bottom, left, right."""

    top: float = 0.0
    bottom: float = 0.0
    left: float = 0.0
    right: float = 0.0

    @property
    def area(self) -> float:
        """Fraction of the picture the bars cover."""
        return 1.0 - (1.0 - self.top - self.bottom) * (1.0 - self.left - self.right)

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 4) for k in ("top", "bottom", "left", "right")}

    def significant(self, minimum: float) -> Borders:
        """Bars thinner than `minimum` (a fraction) set to 0: a dark line at the edge is no letterbox."""
        return Borders(*(v if v >= minimum else 0.0 for v in (self.top, self.bottom, self.left, self.right)))

    def content_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the picture inside the bars, in pixels of a height x width picture."""
        y0, y1 = math.ceil(self.top * height), height - math.ceil(self.bottom * height)
        x0, x1 = math.ceil(self.left * width), width - math.ceil(self.right * width)
        return y0, max(y1, y0 + 2), x0, max(x1, x0 + 2)


def _edge_run(dark: np.ndarray) -> int:
    """Number of leading True values."""
    idx = np.flatnonzero(~dark)
    return int(idx[0]) if idx.size else len(dark)


def detect_borders(frames: list[np.ndarray], black: float) -> Borders | None:
    """Bars of (H, W, 3) uint8 frames (displayed orientation) whose rows/columns stay darker than `black` (0-1)
    in every frame. None when every frame is black all over (nothing to tell a bar from)."""
    if not frames:
        return None
    luma = np.stack([f.mean(axis=2, dtype=np.float32) / 255.0 for f in frames])  # (n, H, W)
    rows = luma.mean(axis=2).max(axis=0)  # brightest each row gets over the samples
    cols = luma.mean(axis=1).max(axis=0)
    if rows.max() < black:
        return None
    h, w = len(rows), len(cols)
    dr, dc = rows < black, cols < black
    return Borders(_edge_run(dr) / h, _edge_run(dr[::-1]) / h, _edge_run(dc) / w, _edge_run(dc[::-1]) / w)


# histogram bins of the scores in _stats.json (fixed, so shards' histograms add up)
MOTION_EDGES = tuple(float(v) for v in np.round(np.logspace(-4, 0, 33), 6))  # 1e-4 .. 1, 8 bins a decade
BORDER_EDGES = tuple(round(i / 20, 2) for i in range(11))  # 0 .. 0.5 of the picture, 0.05 steps
SHOT_EDGES = (0.0, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 1e9)  # seconds


def histogram(values: list[float], edges: tuple[float, ...]) -> list[int]:
    """Counts in [edges[i], edges[i+1]); values below the first edge go to the first bin, above the last to the
    last bin, so every value is counted."""
    if not values:
        return [0] * (len(edges) - 1)
    idx = np.clip(np.searchsorted(np.asarray(edges), np.asarray(values), side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(int).tolist()

"""How the cheap threshold detector compares with TransNetV2 on a real video: precision / recall of cuts, and
which clips span a cut. Used by scripts/compare_cuts.py (the whole 212-s video) and the tests (its first seconds).

A reference cut is the gap between two consecutive TransNetV2 shots: from the last frame of one to the first
frame of the next (a dissolve's frames lie inside it). The threshold detector, as the sharder runs it, compares
resampled frames k-1 and k (at --fps, fitted to --size); a detection at k covers the source times of those two
frames. A detection matches a cut when the two overlap; each cut and each detection is matched at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from vldm.data.codec import fit_frame, open_input
from vldm.data.curate.filters import frame_difference, thumb
from vldm.io import fps_fraction


@dataclass
class Resampled:
    """The sharder's view of a video: per resampled frame k, the chosen source frame's time and the difference of
    its thumbnail to frame k-1's (0 for k = 0)."""

    times: list[float]
    diffs: list[float]
    fps: Fraction


def resample_diffs(path: str, fps: float, size: int = 256, limit_s: float | None = None) -> Resampled:
    """Nearest-timestamp resampling exactly as vldm.data.clips does it, with the threshold detector's measure."""
    target = fps_fraction(fps)
    times: list[float] = []
    diffs: list[float] = []
    last = None
    with open_input(path) as c:
        s = c.streams.video[0]
        tb = Fraction(s.time_base)
        t0 = prev = prev_t = None
        k = 0
        for f in c.decode(s):
            t = f.pts * tb
            t0 = t if t0 is None else t0
            if prev_t is not None and t <= prev_t:
                continue
            while t0 + Fraction(k) / target <= t:
                g = t0 + Fraction(k) / target
                earlier = prev is not None and g - prev_t <= t - g
                frame, ft = (prev, prev_t) if earlier else (f, t)
                th = thumb(fit_frame(frame, size, size))
                diffs.append(frame_difference(th, last) if last is not None else 0.0)
                times.append(float(ft))
                last = th
                k += 1
            prev, prev_t = f, t
            if limit_s is not None and float(t - t0) >= limit_s:
                break
    return Resampled(times, diffs, target)


def reference_cuts(shots: list[list[float]]) -> list[tuple[float, float]]:
    """[(last time of shot j, first time of shot j+1)] for consecutive shots."""
    return [(a[1], b[0]) for a, b in zip(shots, shots[1:])]


def match(detections: list[tuple[float, float]], cuts: list[tuple[float, float]]) -> dict[str, float]:
    """Precision / recall / F1 of detections against reference cuts (interval overlap, one-to-one, greedy in time)."""
    used: set[int] = set()
    tp = 0
    for a, b in detections:
        for j, (c0, c1) in enumerate(cuts):
            if j not in used and a <= c1 + 1e-6 and b >= c0 - 1e-6:
                used.add(j)
                tp += 1
                break
    p = tp / len(detections) if detections else 1.0
    r = tp / len(cuts) if cuts else 1.0
    return {
        "detections": len(detections),
        "cuts": len(cuts),
        "matched": tp,
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
    }


def threshold_detections(res: Resampled, threshold: float, lo: float = 0.0, hi: float = np.inf) -> list[tuple]:
    """Detections [(time of frame k-1, time of frame k)] at `threshold`, for frames k with lo <= time < hi."""
    return [
        (res.times[k - 1], res.times[k])
        for k in range(1, len(res.times))
        if res.diffs[k] > threshold and lo <= res.times[k] < hi
    ]


def sweep(res: Resampled, cuts: list[tuple[float, float]], thresholds: list[float], lo: float, hi: float) -> list[dict]:
    inside = [c for c in cuts if lo <= c[1] < hi]
    return [{"threshold": t, **match(threshold_detections(res, t, lo, hi), inside)} for t in thresholds]


def spans_cut(start_k: int, frames: int, res_times: list[float], shots: list[list[float]]) -> bool:
    """Whether resampled frames start_k .. start_k+frames-1 (their chosen source frames' times) leave one shot."""
    ts = res_times[start_k : start_k + frames]
    for a, b in shots:
        if a - 1e-6 <= ts[0] <= b + 1e-6:
            return not all(a - 1e-6 <= t <= b + 1e-6 for t in ts)
    return True  # the first frame is in a transition

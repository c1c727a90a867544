"""The demo's results: a side-by-side grid (PNG), summary.json and the printed table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vldm.demo.motion import MotionStats, closeness
from vldm.io import atomic_write_bytes, atomic_write_text

GAP = 6  # pixels between the image-model and the video-model half of a row (before scaling)


def _label(img: Image.Image, xy: tuple[int, int], text: str) -> None:
    ImageDraw.Draw(img).text(xy, text, fill=(230, 230, 230))  # PIL's built-in bitmap font: no font files needed


def grid_image(image_mode: list[np.ndarray], video: list[np.ndarray], scale: int = 2, header: int = 14) -> Image.Image:
    """One row per prompt: its image-mode frames | its video-model frames ((F, H, W, 3) uint8 each)."""
    f, h, w = image_mode[0].shape[:3]
    half = f * w
    canvas = np.full((len(image_mode) * (h + 2), 2 * half + GAP, 3), 40, np.uint8)
    for r, (a, b) in enumerate(zip(image_mode, video)):
        y = r * (h + 2)
        canvas[y : y + h, :half] = np.concatenate(list(a), axis=1)
        canvas[y : y + h, half + GAP :] = np.concatenate(list(b), axis=1)
    big = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    out = Image.new("RGB", (big.width, big.height + header), (40, 40, 40))
    out.paste(big, (0, header))
    _label(out, (2, 1), "image model (temporal layers skipped): frames independent")
    _label(out, ((half + GAP) * scale + 2, 1), "video model (temporal layers): same prompts and seeds")
    return out


def save_png(img: Image.Image, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    os.chmod(path, 0o644)  # the atomic write's temp file is private (0600); a picture is for everyone
    return Path(path)


def verdict(image: MotionStats, video: MotionStats, real: MotionStats) -> dict:
    """The claim of issue 7: the video model's motion is far closer to the real clips' than image mode's."""
    d_img, d_vid = closeness(image, real), closeness(video, real)
    ratio = d_img / d_vid if d_vid > 0 else float("inf")
    return {
        "accel_gap_image": d_img,
        "accel_gap_video": d_vid,
        "gap_ratio": ratio,
        "video_closer": bool(d_vid < d_img),
        "far_closer": bool(d_vid * 3 <= d_img),
    }


def table(rows: dict[str, MotionStats]) -> str:
    """The printed table: one line per source of videos."""
    head = (
        f"{'videos':<24}{'n':>3}  {'accel (median)':>14}  {'speed (median)':>14}  {'stable shape':>12}  {'flicker':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        acc = f"{s.accel_median:.4f}" if s.accel_median is not None else "n/a"
        spd = f"{s.speed_median:.4f}" if s.speed_median is not None else "n/a"
        flk = f"{s.flicker:.1f}" if s.flicker is not None else "n/a"
        lines.append(f"{name:<24}{s.num_videos:>3}  {acc:>14}  {spd:>14}  {s.stable_presence:>12.0%}  {flk:>7}")
    return "\n".join(lines)


def write_summary(path: str | Path, data: dict) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)

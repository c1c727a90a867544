"""Weight-free video metrics: they need no downloaded network, so they run everywhere.

- temporal flicker: mean |frame[t+1] - frame[t]| over pixels and frame pairs, on the 0..255 scale
  (0 = a still image; pure noise is about 85);
- frame-to-frame consistency: mean cosine similarity of consecutive frames' features; the
  weight-free features are each frame pooled to a small grid with its mean removed (so a global
  brightness change does not count, a change of content does);
- validation diffusion loss: the training objective at fixed timesteps with fixed noise on held-out
  clips, comparable between checkpoints because nothing in it is random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange


def quantize_uint8(videos: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the same videos as 8-bit values mapped back to [-1, 1] (what an mp4 frame holds)."""
    u8 = ((videos.float().clamp(-1, 1) + 1) * 127.5).round()
    return u8 / 127.5 - 1


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(f, h, w, 3) or (b, f, h, w, 3) uint8 -> (b, 3, f, h, w) float in [-1, 1]."""
    if frames.ndim == 4:
        frames = frames[None]
    return rearrange(frames.float() / 127.5 - 1, "b f h w c -> b c f h w")


def temporal_flicker(videos: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) in [-1, 1] -> (b,) mean absolute difference of consecutive frames, 0..255 scale."""
    if videos.shape[2] < 2:
        raise ValueError("temporal flicker needs at least 2 frames")
    diff = (videos[:, :, 1:].float() - videos[:, :, :-1].float()).abs()
    return (diff.flatten(1).mean(1) * 127.5).double()  # [-1, 1] spans 255 levels: 2 units = 255


def pixel_features(frames: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(n, c, h, w) -> (n, c*size*size) area-pooled frames with each frame's per-channel mean removed."""
    x = F.adaptive_avg_pool2d(frames.float(), size)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x.flatten(1)


def frame_consistency(
    videos: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None, size: int = 16
) -> torch.Tensor:
    """(b, c, f, h, w) -> (b,) mean cosine similarity of consecutive frames' features (1 = unchanging)."""
    b, f = videos.shape[0], videos.shape[2]
    if f < 2:
        raise ValueError("frame consistency needs at least 2 frames")
    frames = rearrange(videos, "b c f h w -> (b f) c h w")
    feats = features(frames) if features is not None else pixel_features(frames, size)
    feats = feats.float().view(b, f, -1)
    # a flat frame has a zero feature vector: eps keeps the cosine defined (0 against anything)
    sim = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1, eps=1e-8)
    return sim.mean(1).double()


def noise_seed(seed: int, index: int, timestep: int) -> int:
    """Seed of the noise for held-out clip `index` at `timestep`: depends on nothing else."""
    digest = hashlib.sha256(f"vldm-val-noise:{seed}:{index}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def validation_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    indices: list[int],
    scheduler,
    timesteps: tuple[int, ...] | list[int],
    seed: int,
) -> torch.Tensor:
    """(b, len(timesteps)) MSE of the model's eps/v prediction on clip latents (b, c, f, h, w).

    Clip `indices[i]` gets the same noise at timestep t in every call (see `noise_seed`), so the loss
    of two checkpoints differs only by their weights. `model_fn(noisy, timesteps) -> prediction`.
    """
    from vldm.diffusion.loss import diffusion_loss

    n_train = scheduler.config.num_train_timesteps
    out = torch.zeros(latents.shape[0], len(timesteps), dtype=torch.float64)
    for j, t in enumerate(timesteps):
        if not 0 <= t < n_train:
            raise ValueError(f"val_loss.timesteps: {t} is outside [0, {n_train})")
        noise = torch.stack(
            [
                torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(noise_seed(seed, i, t)))
                for i in indices
            ]
        ).to(latents.device, latents.dtype)
        ts = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)
        out[:, j] = diffusion_loss(model_fn, latents, scheduler, timesteps=ts, noise=noise, reduce=False).double().cpu()
    return out

"""Where training batches come from: the shard loader (`vldm.data.build_loader`) or a synthetic source.

Both yield dicts {"pixels" (B,C,F,H,W) in [-1,1] or "latents" (B,c,F,h,w), "captions", "keys",
"meta"} and have state_dict()/load_state_dict(), so the position in the data is part of a checkpoint.

The synthetic source (data.shards empty) makes random textures that translate by a per-clip velocity
over the frames, captioned with their direction: frames are correlated, so the temporal layers have
something to learn, and every sample is a pure function of (seed, global sample index). That makes
the global batch independent of how it is split over ranks (1 rank x 4 clips == 2 ranks x 2 clips) and
makes resume exact at any world size with the same global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from vldm.config.schema import Config

DIRECTIONS = {"still": (0, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
COLOURS = ("red", "green", "blue", "yellow", "white")


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class SyntheticClips:
    """Deterministic moving-texture clips; sample g (global index) depends only on (seed, g)."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        channels: int,
        height: int,
        width: int,
        kind: str = "latents",
        num_labels: int = 0,
        text_shape: tuple[int, int] | None = None,
    ):
        self.seed = cfg.seed
        self.batch_size = cfg.data.batch_size
        self.num_frames = cfg.data.num_frames
        self.rank, self.world_size = rank, world_size
        self.shape = (channels, height, width)
        self.kind = kind  # "latents" (UNet input) or "pixels" (VAE input, in [-1, 1])
        self.num_labels = num_labels
        # (tokens, width): also yield zero "text_embeds" of this shape, as latent shards with text embeddings
        # do (a text context of real length for benchmarks of a model without its text encoder)
        self.text_shape = text_shape
        self.batches = 0  # micro-batches this rank has yielded

    def __iter__(self) -> Iterator[dict]:
        return self

    def sample(self, index: int) -> tuple[torch.Tensor, str, dict]:
        g = torch.Generator().manual_seed(seed_of("synthetic", self.seed, index))
        c, h, w = self.shape
        # smooth texture: low-res noise upsampled, so a shift of one pixel is a small, learnable change
        base = torch.randn(1, c, max(2, h // 4), max(2, w // 4), generator=g)
        base = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[0]
        names = list(DIRECTIONS)
        direction = names[int(torch.randint(len(names), (1,), generator=g))]
        colour = COLOURS[int(torch.randint(len(COLOURS), (1,), generator=g))]
        dy, dx = DIRECTIONS[direction]
        frames = torch.stack(
            [torch.roll(base, shifts=(t * dy, t * dx), dims=(1, 2)) for t in range(self.num_frames)], 1
        )
        if self.kind == "pixels":
            frames = torch.tanh(frames)
        meta: dict[str, Any] = {"direction": direction}
        if self.num_labels:
            meta["label"] = int(torch.randint(self.num_labels, (1,), generator=g))
        return frames.contiguous(), f"a {colour} texture moving {direction}", meta

    def __next__(self) -> dict:
        # global sample index: batch-major over the whole job, then rank, then position
        first = (self.batches * self.world_size + self.rank) * self.batch_size
        items = [self.sample(first + j) for j in range(self.batch_size)]
        self.batches += 1
        batch = {
            self.kind: torch.stack([x for x, _, _ in items]),
            "captions": [cap for _, cap, _ in items],
            "keys": [f"synthetic{first + j:010d}" for j in range(self.batch_size)],
            "meta": [m for _, _, m in items],
        }
        if self.text_shape:
            batch["text_embeds"] = torch.zeros(self.batch_size, *self.text_shape)
        return batch

    def state_dict(self) -> dict:
        return {
            "kind": "synthetic",
            "batches": self.batches,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        consumed = state["batches"] * state["batch_size"] * state["world_size"]
        per_batch = self.batch_size * self.world_size
        if consumed % per_batch:
            raise ValueError(
                f"synthetic data position {consumed} samples is not a multiple of the new global batch {per_batch}"
            )
        self.batches = consumed // per_batch


def clip_geometry(batch: dict, vae_scale: int) -> tuple[int, int, int] | None:
    """(frames, latent h, latent w) of one batch: the shape its clips have in the model (aspect/length buckets
    change it from batch to batch; the config's data.size / num_frames describe only a flat layout). None for a
    batch of neither latents nor pixels (a custom source): the caller assumes the config's shape."""
    for key, scale in (("latents", 1), ("pixels", vae_scale)):
        x = batch.get(key)
        if x is not None and getattr(x, "ndim", 0) == 5:
            f, h, w = x.shape[2:]
            return int(f), int(h) // scale, int(w) // scale
    return None


def bucket_geometries(source, vae_scale: int) -> dict[str, tuple[int, int, int]]:
    """Bucket name -> (frames, latent h, latent w) of every bucket the shard loader draws from, in its order (the
    index `data/bucket` logs); {} for a flat layout or the synthetic source. The shapes whose FLOPs are counted."""
    c = getattr(source, "cfg", None)
    return {
        b.name: (c.num_frames, b.height // vae_scale, b.width // vae_scale)
        for b in getattr(source, "buckets", [])
        if b.name and b.height and b.width
    }


def data_metrics(source, batch: dict | None = None) -> dict[str, float]:
    """The shard loader's counters summed over ranks, for the metrics line: `data/corrupt_samples` and
    `data/corrupt/<reason>` (samples skipped on any rank), `data/shard_retries`, and `data/epoch` (passes
    over the data: a rank's samples drawn / its share, averaged over ranks; fractional, and ranks differ
    a little once one has skipped samples); with a bucketed `batch`, the bucket it came from (`data/bucket`, its
    index in the loader's list, `data/height`, `data/width`, `data/frames` in pixels and clip frames) and
    `data/ranks_same_bucket` (1 when every rank's batch came from it). Collective: every rank calls it at the same
    step. {} for sources without these counters (the synthetic source), on every rank alike."""
    from vldm.train import dist

    stats = getattr(source, "stats", None)
    if not isinstance(stats, dict) or "corrupt_by_reason" not in stats:
        return {}
    from vldm.data.loader import CORRUPT_REASONS

    by_reason = stats["corrupt_by_reason"]
    local = [1.0, float(stats.get("epoch", 0)), float(stats.get("shard_retries", 0))]
    local += [float(by_reason.get(r, 0)) for r in CORRUPT_REASONS]
    ranks, epochs, retries, *corrupt = dist.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
    out = {"data/epoch": epochs / ranks, "data/shard_retries": retries, "data/corrupt_samples": sum(corrupt)}
    out.update({f"data/corrupt/{r}": v for r, v in zip(CORRUPT_REASONS, corrupt)})
    if batch is not None and "bucket" in batch:
        # the bucket of this step's (last) batch, and whether every rank drew the same one: the loader's
        # schedule is a function of the seed and the layout alone, so a 0 here means the ranks read different
        # shard lists (a bucketed step is one shape on every rank, else the batch shapes would differ per rank)
        h, w, f = (int(v) for v in batch["bucket"].split("x"))
        names = [b.name for b in getattr(source, "buckets", [])]
        code = float((h * 10_000 + w) * 10_000 + f)
        hi, neg_lo = dist.all_reduce(torch.tensor([code, -code], dtype=torch.float64), "max").tolist()
        out.update(
            {
                "data/bucket": float(names.index(batch["bucket"])) if batch["bucket"] in names else -1.0,
                "data/height": float(h),
                "data/width": float(w),
                "data/frames": float(f),
                "data/ranks_same_bucket": float(hi == -neg_lo),
            }
        )
    return out


def build_source(
    cfg: Config,
    rank: int,
    world_size: int,
    channels: int,
    latent_hw: tuple[int, int],
    vae_scale: int,
    has_vae: bool,
    num_labels: int = 0,
):
    """The shard loader when `data.shards` is set, else the synthetic source (latents, or pixels when a
    VAE is loaded and `data.use_latents` is off, so the encode path runs as with real data)."""
    if cfg.data.shards:
        try:
            from vldm.data import build_loader  # the data pipeline (vldm/data)
        except ImportError as e:
            raise RuntimeError(f"data.shards is set but the shard loader is unavailable: {e}") from e
        return build_loader(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)
    h, w = latent_hw
    if has_vae and not cfg.data.use_latents:
        return SyntheticClips(cfg, rank, world_size, 3, h * vae_scale, w * vae_scale, "pixels", num_labels)
    return SyntheticClips(cfg, rank, world_size, channels, h, w, "latents", num_labels)

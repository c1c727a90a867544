"""Data section: where training clips come from and how they are cut and batched."""

from __future__ import annotations

from dataclasses import dataclass

from vldm.config.core import field_


@dataclass
class DataConfig:
    shards: str = field_("", "WebDataset shards: a directory, glob, brace pattern, or pipe:/fsspec URL; empty = synthetic random latents")
    num_frames: int = field_(8, "frames per training clip")
    frame_stride: int = field_(1, "take every n-th frame of a stored clip")
    size: int = field_(32, "square pixel size fed to the VAE (clips are stored already resized)")
    batch_size: int = field_(2, "clips per rank per micro-step")
    num_workers: int = field_(0, "loader worker processes per rank")
    shuffle_buffer: int = field_(64, "samples held for shuffling (0 = no shuffle)")
    use_latents: bool = field_(False, "read precomputed VAE latents from the shards instead of decoding mp4")

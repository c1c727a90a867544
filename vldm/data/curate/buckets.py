"""Aspect and length buckets: `--buckets 256x256x16,320x512x16,512x320x16` (height x width x frames of clips).

A source goes to the bucket whose aspect ratio (width / height, after rotation and border crop) is nearest on a
log scale (so 2:1 and 1:2 are equally far from 1:1); among buckets of that size, a clip takes the longest length
that fits in what is left of its shot. Clips are resized to cover the bucket and centre-cropped, as without
buckets: at most the difference between the source's and the bucket's aspect is cropped away.

Layout (the contract with the loader): OUTPUT/<bucket>/{prefix}-{shard:06d}.tar (+ manifest, done marker), each
bucket directory a complete flat layout with its own `_shards.json`; OUTPUT/_shards.json lists every bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(text: str) -> tuple[Bucket, ...]:
    """'256x256x16,320x512x16' -> buckets (sorted, unique); '' -> (). Raises ValueError naming the bad item."""
    out: set[Bucket] = set()
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        parts = item.split("x")
        try:
            h, w, f = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"buckets: {item!r} is not HxWxF (e.g. 320x512x16)") from None
        if h <= 0 or w <= 0 or f <= 0 or h % 2 or w % 2:
            raise ValueError(f"buckets: {item!r}: height and width must be positive and even, frames positive")
        out.add(Bucket(h, w, f))
    return tuple(sorted(out))


def choose_size(buckets: tuple[Bucket, ...], height: int, width: int) -> tuple[int, int]:
    """(height, width) of the bucket size nearest to a picture of height x width, by log aspect ratio; ties go to
    the larger area (less upscaling of big sources is not at stake: clips are resized either way)."""
    a = math.log(width / height)
    sizes = sorted({(b.height, b.width) for b in buckets})
    return min(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - a), 9), -s[0] * s[1]))


def lengths_for(buckets: tuple[Bucket, ...], size: tuple[int, int]) -> tuple[int, ...]:
    """Clip lengths of the buckets of one size, longest first."""
    return tuple(sorted({b.frames for b in buckets if (b.height, b.width) == size}, reverse=True))

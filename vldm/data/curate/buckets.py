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

from vldm.config.data import Bucket, parse_buckets  # the format of the `buckets` option lives in the schema

__all__ = ["Bucket", "choose_size", "lengths_for", "parse_buckets"]


def choose_size(buckets: tuple[Bucket, ...], height: int, width: int) -> tuple[int, int]:
    """(height, width) of the bucket size nearest to a picture of height x width, by log aspect ratio; ties go to
    the larger area (less upscaling of big sources is not at stake: clips are resized either way)."""
    a = math.log(width / height)
    sizes = sorted({(b.height, b.width) for b in buckets})
    return min(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - a), 9), -s[0] * s[1]))


def lengths_for(buckets: tuple[Bucket, ...], size: tuple[int, int]) -> tuple[int, ...]:
    """Clip lengths of the buckets of one size, longest first."""
    return tuple(sorted({b.frames for b in buckets if (b.height, b.width) == size}, reverse=True))

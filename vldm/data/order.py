"""Which sample each rank and loader worker reads, in which order: pure functions of the shard sizes
and (seed, epoch, world_size, num_workers, batch_size, drop_last, shuffle_buffer).

Epoch e:
1. shards are permuted (seeded by seed, e) and concatenated: the epoch sequence of M samples;
2. rank r takes the contiguous slice [r * M // W, (r + 1) * M // W)... of equal length n = M // W,
   so every rank yields the same number of batches, nb = n // B (or ceil with drop_last off): DDP
   ranks never wait on each other at the end of an epoch, and every sample is read at most once
   (exactly once when W divides M and, with drop_last, B divides n);
3. rank batch j is produced by worker j % K (torch's DataLoader takes batches from its workers
   round robin, so the rank's batch order is fixed); worker w reads one contiguous part of the
   rank's slice (few shards, sequential reads) and shuffles it with a bounded buffer;
4. the shuffle buffer runs on positions, so where a worker is after b batches is known without
   reading anything: resuming skips the consumed samples' bytes and decodes nothing of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the shard list
    begin: int  # first sample index inside the shard
    end: int  # one past the last


@dataclass
class WorkerPlan:
    segments: list[Segment]  # the worker's samples, in reading order (positions 0..n-1 follow them)
    order: list[int]  # emission order of positions (the shuffle buffer's output)
    batch_sizes: list[int]  # sizes of the worker's batches, in order
    batch_ids: list[int]  # the rank-level batch index of each
    offset: int  # position 0 of this worker in the epoch sequence (seeds per-sample randomness)


def samples_per_rank(total: int, world_size: int) -> int:
    return total // world_size


def batches_per_epoch(total: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    n = samples_per_rank(total, world_size)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def shard_permutation(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)]


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """Output order of a streaming shuffle buffer of `buffer` items over inputs 0..n-1. Output t is
    always one of the first t + buffer inputs, so a reader needs at most `buffer` samples in memory."""
    if buffer <= 1 or n <= 1:
        return list(range(n))
    draws = rng.random(n)
    buf: list[int] = []
    out: list[int] = []
    for p in range(n):
        buf.append(p)
        if len(buf) >= buffer:
            j = int(draws[len(out)] * len(buf))
            out.append(buf[j])
            buf[j] = buf[-1]
            buf.pop()
    while buf:
        j = int(draws[len(out)] * len(buf))
        out.append(buf[j])
        buf[j] = buf[-1]
        buf.pop()
    return out


def _segments(counts: list[int], perm: list[int], start: int, stop: int) -> list[Segment]:
    """Samples [start, stop) of the concatenation of shards in `perm` order, as shard segments."""
    segs = []
    pos = 0
    for s in perm:
        lo, hi = max(start, pos), min(stop, pos + counts[s])
        if lo < hi:
            segs.append(Segment(s, lo - pos, hi - pos))
        pos += counts[s]
        if pos >= stop:
            break
    return segs


def worker_plan(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    worker: int,
    batch_size: int,
    drop_last: bool,
    shuffle_buffer: int,
    shuffle: bool = True,
) -> WorkerPlan:
    """What loader worker `worker` (of `num_workers`, >= 1) of rank `rank` reads in epoch `epoch`."""
    total = sum(counts)
    n = samples_per_rank(total, world_size)
    nb = batches_per_epoch(total, world_size, batch_size, drop_last)
    sizes = [min(batch_size, n - j * batch_size) for j in range(nb)]
    k = max(1, num_workers)
    # contiguous part of the rank slice per worker, in worker order
    offset = rank * n
    for w in range(worker):
        offset += sum(sizes[j] for j in range(w, nb, k))
    ids = list(range(worker, nb, k))
    mine = [sizes[j] for j in ids]
    count = sum(mine)
    perm = shard_permutation(len(counts), seed, epoch, shuffle)
    rng = np.random.default_rng([seed, epoch, rank, worker, 0xB0FF])
    order = buffer_shuffle(count, shuffle_buffer, rng) if shuffle else list(range(count))
    return WorkerPlan(_segments(counts, perm, offset, offset + count), order, mine, ids, offset)

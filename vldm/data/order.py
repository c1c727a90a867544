"""Which sample each rank and loader worker reads, in which order, and which bucket each batch comes
from: pure functions of the shard sizes and (seed, epoch, world_size, num_workers, batch_size,
shuffle_buffer).

Per bucket (a flat layout is one bucket) and epoch e:
1. the bucket's shards are permuted (seeded by seed, e, bucket) and concatenated: the epoch sequence of
   M samples;
2. rank r takes the contiguous slice [r * n, (r + 1) * n), n = M // W: every sample is read at most
   once per epoch (exactly once when W divides M);
3. the rank slice is cut into K contiguous worker parts (K = loader workers, 1 without), sizes n // K
   or n // K + 1 (which workers get the extra sample rotates with the epoch, so over K epochs every
   worker reads the same number of samples); worker w shuffles its part with a bounded buffer;
4. worker w's *stream* is its part of epoch e0, then of e0 + 1, ... (e0: the epoch the run, or the
   last change of layout, started at). A batch is the next batch_size readable samples of the stream:
   a corrupt sample is skipped and the batch refilled from the stream, so every batch is full and a
   batch may span two epochs. Where a worker is is one number, the samples its stream has consumed,
   so resuming skips the consumed samples' bytes and decodes nothing of them;
5. batches go to workers round robin (torch's DataLoader takes them from its workers in turn): rank
   batch g is produced by worker g % K, and the K batches g = jK .. jK + K - 1 (round j) all come from
   one bucket, so every worker reads the same number of samples from every bucket and no worker's
   stream drifts from the others';
6. the bucket of round j is a pure function of (seed, e0, j): block k of the schedule (epoch e0 + k)
   holds floor((k+1) n_b / (B K)) - floor(k n_b / (B K)) rounds of bucket b, shuffled. Bucket
   frequencies follow the buckets' sample counts exactly over every block, and every rank (same
   seed, same e0, one batch per micro-step) draws the same bucket at the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the bucket's shard list
    begin: int  # first sample index inside the shard
    end: int  # one past the last


@dataclass
class Part:
    """One worker's samples of one epoch of one bucket."""

    epoch: int
    segments: list[Segment]  # the samples, in reading order (positions 0..size-1 follow them)
    order: list[int]  # emission order of positions (the shuffle buffer's output)
    offset: int  # position 0 of this part in the epoch sequence (seeds per-sample randomness)

    @property
    def size(self) -> int:
        return len(self.order)


def samples_per_rank(total: int, world_size: int) -> int:
    return total // world_size


def batches_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Full batches one epoch of a rank's share holds (nominal: with refill, batches span epochs)."""
    return samples_per_rank(total, world_size) // batch_size


def part_sizes(n: int, num_workers: int, epoch: int) -> list[int]:
    """Sizes of the K worker parts of a rank slice of n samples in `epoch`."""
    k = max(1, num_workers)
    q, r = divmod(n, k)
    return [q + (1 if (w - epoch) % k < r else 0) for w in range(k)]


def shard_permutation(num_shards: int, seed: int, epoch: int, shuffle: bool, bucket: int = 0) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D, bucket]).permutation(num_shards)]


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


def worker_part(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    worker: int,
    shuffle_buffer: int,
    shuffle: bool = True,
    bucket: int = 0,
) -> Part:
    """What loader worker `worker` (of `num_workers`) of rank `rank` reads of `bucket` in `epoch`."""
    n = samples_per_rank(sum(counts), world_size)
    sizes = part_sizes(n, num_workers, epoch)
    offset = rank * n + sum(sizes[:worker])
    size = sizes[worker]
    perm = shard_permutation(len(counts), seed, epoch, shuffle, bucket)
    rng = np.random.default_rng([seed, epoch, rank, worker, bucket, 0xB0FF])
    order = buffer_shuffle(size, shuffle_buffer, rng) if shuffle else list(range(size))
    return Part(epoch, _segments(counts, perm, offset, offset + size), order, offset)


def locate(n: int, num_workers: int, worker: int, epoch0: int, consumed: int) -> tuple[int, int]:
    """(epoch, index in that epoch's emission order) of the next sample of worker `worker`'s stream
    after `consumed` samples, for a rank share of n samples. Parts are empty only when n < K."""
    k = max(1, num_workers)
    cycle = n  # over K consecutive epochs every worker reads exactly n samples (see part_sizes)
    epoch = epoch0
    if cycle:
        full = consumed // cycle
        epoch, consumed = epoch + full * k, consumed - full * cycle
    while True:
        size = part_sizes(n, k, epoch)[worker]
        if consumed < size:
            return epoch, consumed
        consumed -= size
        epoch += 1


class BucketSchedule:
    """The bucket of every round of K batches (see the module docstring, item 6)."""

    def __init__(self, per_rank: list[int], batch_size: int, num_workers: int, seed: int, epoch0: int):
        if not per_rank or min(per_rank) < 1:
            raise ValueError(f"every bucket needs samples on every rank, got {per_rank}")
        self.per_rank, self.seed, self.epoch0 = per_rank, seed, epoch0
        self.denom = batch_size * max(1, num_workers)  # samples of one bucket a round consumes per rank
        self._starts = [0]  # first round of each block computed so far
        self._block: tuple[int, list[int]] | None = None  # the block whose order is cached

    def rounds_in_block(self, k: int) -> list[int]:
        d = self.denom
        return [((k + 1) * n) // d - (k * n) // d for n in self.per_rank]

    def block_of(self, round_: int) -> tuple[int, int]:
        """(block k, index of the round inside block k)."""
        while self._starts[-1] <= round_:
            self._starts.append(self._starts[-1] + sum(self.rounds_in_block(len(self._starts) - 1)))
        k = int(np.searchsorted(self._starts, round_, side="right")) - 1
        return k, round_ - self._starts[k]

    def bucket(self, round_: int) -> int:
        if len(self.per_rank) == 1:
            return 0
        k, i = self.block_of(round_)
        if self._block is None or self._block[0] != k:
            rounds = self.rounds_in_block(k)
            seq = np.repeat(np.arange(len(rounds)), rounds)
            rng = np.random.default_rng([self.seed, self.epoch0 + k, 0x5C4E])
            self._block = (k, [int(b) for b in rng.permutation(seq)])
        return self._block[1][i]

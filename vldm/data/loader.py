"""The training loader over vldm shards: `build_loader(cfg.data, rank, world_size, seed)`.

Why not `webdataset.WebDataset`: the shards are WebDataset-compatible, but training here needs two
things its pipelines don't give together: exact mid-epoch resume (no sample repeated or skipped,
with a shuffle buffer and several workers) and, under DDP, the same number of batches on every rank
while each sample is still read once per epoch (resampled shards + with_epoch give equal counts but
not coverage), and, with batch 1 per GPU, a corrupt sample must not empty a batch (ranks would
fall out of step) nor make a resume replay into it. order.py makes the sample order a pure function of
the seed, epoch and layout; this module reads it (streaming, no seeks: local files, fsspec URLs and pipe:
commands all work), skips and counts what cannot be read, and refills the batch from the same order.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import multiprocessing
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vldm.config.data import DataConfig
from vldm.data.codec import decode_window, u8_to_unit_range
from vldm.data.format import EXT_LATENTS, EXT_MP4, EXT_TEXT_EMB, decode_sample
from vldm.data.latents import npy_load
from vldm.data.order import BucketSchedule, Segment, locate, samples_per_rank, worker_part
from vldm.data.tario import iter_samples
from vldm.data.urls import NO_RETRY, Bucket, Retry, layout, open_shard

log = logging.getLogger("vldm.data")
STATE_VERSION = 2
# why a sample was skipped: a closed set, so every rank can sum the counts in one fixed-size all-reduce
CORRUPT_REASONS = ("decode_error", "bad_json", "too_short", "no_latents", "missing", "shard_error")


class BufferPool:
    """Batch buffers handed out again once nothing uses them any more.

    Why: a float32 batch is ~100 MB (8 clips of 16 x 256 x 256); glibc serves blocks that large with a
    fresh mmap and unmaps them on free, so every new batch costs a page fault and a kernel zeroing per
    page. On clips that decode fast that costs more than decoding them (measured: the float32 loader
    at 0.46x raw decode with fresh buffers). Whether a buffer is free is read from its refcount:
    `torch.from_numpy` makes the tensor's storage hold a reference to the array and every view or
    slice shares that storage, so the count falls back only when the consumer has dropped all of them
    (a batch kept anywhere, e.g. saved for backward, is never overwritten).
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.reused = 0
        self._arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        for i in range(len(self._arrays)):
            a = self._arrays[i]
            # references: the list, `a`, getrefcount's argument; any more means a tensor still uses it
            if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) == 3:
                self.reused += 1
                return a
            del a
        arr = np.empty(shape, dtype)
        self._arrays.append(arr)
        if len(self._arrays) > self.keep:  # the consumer keeps batches: track only the newest
            self._arrays.pop(0)
        return arr


class SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Reader:
    """Serves the samples of a worker's segments by position, reading them in order. Samples in `skip`
    (already consumed before a resume) are stepped over without being read; others wait in a dict
    until asked for, which the shuffle-buffer order bounds to `shuffle_buffer` entries.

    A shard that fails to open or fails mid-read is re-opened (after `retry`'s backoff) and read on
    from the sample after the last one read (the samples before it are stepped over, not decoded);
    the retry budget is per failure, renewed once a retry has read a new sample. When it is spent,
    the segment's remaining samples are served as errors (reason "shard_error")."""

    def __init__(self, urls: list[str], segments: list[Segment], skip: set[int], retry: Retry = NO_RETRY):
        self.urls, self.segments, self.skip, self.retry = urls, segments, skip, retry
        self.ready: dict[int, tuple[str, dict[str, bytes] | None, SampleError | None]] = {}
        self.retries = 0  # re-opens after a failure, for the loader's stats
        self._it = self._stream()

    def _segment(self, url: str, seg: Segment, base: int) -> Iterator[tuple[int, str, dict | None, SampleError | None]]:
        got = 0  # samples of the segment passed so far (read, or stepped over)

        def want(i: int) -> bool:
            return seg.begin + got <= i < seg.end and base + i - seg.begin not in self.skip

        failures = 0
        err: SampleError | None = None
        while got < seg.end - seg.begin:
            try:
                with open_shard(url) as f:
                    for i, key, members in iter_samples(f, want=want, stop=seg.end):
                        if i < seg.begin + got:
                            continue  # before the segment, or read before a failure
                        yield base + got, key, members, None
                        got += 1
                        failures = 0  # progress: a later failure gets the whole retry budget again
                if got < seg.end - seg.begin:
                    err = SampleError(
                        "missing", f"{url} has fewer samples than indexed ({seg.begin + got} < {seg.end})"
                    )
                break
            except Exception as e:  # noqa: BLE001 - unreadable / broken stream: retry, then count the rest
                why = f"{type(e).__name__}: {e}"
                if failures >= self.retry.retries:
                    tries = f" (after {failures} retries)" if failures else ""
                    err = SampleError("shard_error", f"{url}: {why}{tries}")
                    break
                failures += 1
                self.retries += 1
                wait = self.retry.delay(failures)
                log.warning(
                    "shard %s failed at sample %d (%s): retry %d/%d in %.1f s",
                    url,
                    seg.begin + got,
                    why,
                    failures,
                    self.retry.retries,
                    wait,
                )
                time.sleep(wait)
        name = url.rsplit("/", 1)[-1]
        for _ in range(seg.end - seg.begin - got):
            yield base + got, f"{name}#{seg.begin + got}", None, err
            got += 1

    def _stream(self) -> Iterator[tuple[int, str, dict[str, bytes] | None, SampleError | None]]:
        base = 0  # position of the current segment's first sample
        for seg in self.segments:
            yield from self._segment(self.urls[seg.shard], seg, base)
            base += seg.end - seg.begin

    def get(self, pos: int) -> tuple[str, dict[str, bytes] | None, SampleError | None]:
        while pos not in self.ready:
            p, key, members, err = next(self._it)
            if p not in self.skip:
                self.ready[p] = (key, members, err)
        return self.ready.pop(pos)

    def close(self) -> None:
        self._it.close()  # closes the open shard (and ends a pipe's process) now, not at garbage collection


@dataclass
class _Drawn:
    key: str
    members: dict[str, bytes] | None
    err: SampleError | None
    seq_pos: int  # place in its epoch's sequence (seeds the random clip window)
    epoch: int


class _WorkerStream:
    """One loader worker's endless stream of one bucket: its part of epoch e0, then of e0 + 1, ...
    (order.py, item 4). `consumed` counts the samples drawn since e0: the whole resume state."""

    def __init__(self, src: _Source, bucket: int, worker: int, consumed: int):
        self.src, self.bucket, self.worker = src, bucket, worker
        b = src.buckets[bucket]
        self.n = samples_per_rank(sum(b.counts), src.world_size)
        self.consumed = consumed
        epoch, index = locate(self.n, src.num_workers, worker, src.epoch0, consumed)
        self._open(epoch, index)

    def _open(self, epoch: int, index: int) -> None:
        s, b = self.src, self.src.buckets[self.bucket]
        self.part = worker_part(
            b.counts,
            seed=s.seed,
            epoch=epoch,
            rank=s.rank,
            world_size=s.world_size,
            num_workers=s.num_workers,
            worker=self.worker,
            shuffle_buffer=s.cfg.shuffle_buffer if s.shuffle else 0,
            shuffle=s.shuffle,
            bucket=self.bucket,
        )
        self.index = index
        self.reader = _Reader(b.urls, self.part.segments, set(self.part.order[:index]), s.retry)

    @property
    def retries(self) -> int:
        return self.reader.retries

    def next(self) -> _Drawn | None:
        """The next sample; None at the end of the part when `endless` is off."""
        while self.index >= self.part.size:
            if not self.src.endless:
                return None
            retries = self.reader.retries
            self.reader.close()
            self._open(self.part.epoch + 1, 0)
            self.reader.retries = retries
        pos = self.part.order[self.index]
        self.index += 1
        self.consumed += 1
        key, members, err = self.reader.get(pos)
        return _Drawn(key, members, err, self.part.offset + pos, self.part.epoch)


class _Source(IterableDataset):
    """Batches of one rank, produced in this process (num_workers=0) or in its DataLoader workers.

    Training (`endless`): rank batch g (counted since the order started at epoch0; this iteration begins
    at batch0, the batches the loader had yielded) is made by logical worker g % K from its stream of
    bucket `schedule.bucket(g // K)`; every batch holds batch_size readable samples (refilled from the
    stream). One pass (`endless` off): each worker reads its part of epoch e0 of every bucket in turn;
    a part's last batch may be short."""

    def __init__(
        self,
        buckets: list[Bucket],
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        epoch0: int,
        batch0: int,
        consumed: list[list[int]],
        shuffle: bool,
        endless: bool,
        drop_last: bool,
        pool: BufferPool | None = None,
    ):
        super().__init__()
        self.buckets, self.cfg = buckets, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, cfg.num_workers)
        self.epoch0, self.batch0, self.consumed = epoch0, batch0, consumed
        self.shuffle, self.endless, self.drop_last = shuffle, endless, drop_last
        self.retry = Retry.from_config(cfg)
        self.pool = pool  # main process only (num_workers=0): workers allocate shared memory per batch
        self._u8: np.ndarray | None = None  # the clip buffer float32 batches are decoded through

    def schedule(self) -> BucketSchedule:
        per_rank = [samples_per_rank(sum(b.counts), self.world_size) for b in self.buckets]
        return BucketSchedule(per_rank, self.cfg.batch_size, self.cfg.num_workers, self.seed, self.epoch0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        proc = info.id if info is not None else 0
        if not self.endless:
            yield from self._one_pass(proc)
            return
        k = self.num_workers
        # DataLoader asks its workers round robin from worker process 0: the process that starts must
        # make batch batch0, so process p plays logical worker (batch0 + p) % K
        g = self.batch0 + proc
        worker = g % k
        schedule = self.schedule()
        streams: dict[int, _WorkerStream] = {}
        while True:
            b = schedule.bucket(g // k)
            if b not in streams:
                streams[b] = _WorkerStream(self, b, worker, self.consumed[b][worker])
            yield self._batch(streams[b], g)
            g += k

    def _one_pass(self, proc: int) -> Iterator[dict[str, Any]]:
        for b in range(len(self.buckets)):
            stream = _WorkerStream(self, b, proc, 0)
            while True:
                batch = self._batch(stream, -1)
                if not batch["keys"] or (self.drop_last and len(batch["keys"]) < self.cfg.batch_size):
                    break
                yield batch
                if len(batch["keys"]) < self.cfg.batch_size:
                    break
            stream.reader.close()

    def _batch(self, stream: _WorkerStream, batch_id: int) -> dict[str, Any]:
        """The next batch_size readable samples of `stream` (fewer only at the end of a one-pass part)."""
        c = self.cfg
        bucket = self.buckets[stream.bucket]
        hw = bucket.hw or c.hw
        # pixels go straight into the batch tensor (slot = samples kept so far; a corrupt sample's slot is
        # overwritten by the next one). uint8 from worker processes (shared memory is freshly allocated
        # for every batch, and its page faults cost more than the conversion): ClipLoader converts them.
        u8 = c.pixel_dtype == "uint8" or get_worker_info() is not None
        pixels = (
            None
            if c.use_latents
            else _batch_tensor((c.batch_size, 3, c.num_frames, *hw), torch.uint8 if u8 else torch.float32, self.pool)
        )
        items: list[dict[str, Any]] = []
        dropped: list[tuple[str, str, str]] = []
        retries0, streak, last_err = stream.retries, 0, None
        while len(items) < c.batch_size:
            d = stream.next()
            if d is None:
                break
            # the samples one shard failure costs count once: a shard that stays unreadable is one bad read
            repeat, last_err = d.err is not None and d.err is last_err, d.err
            try:
                if d.err is not None:
                    raise d.err
                slot = None if pixels is None else pixels.numpy()[len(items)]
                items.append(self._decode(d, stream.bucket, hw, slot))
                streak = 0
                continue
            except SampleError as e:
                dropped.append((d.key, e.reason, str(e)))
            except Exception as e:  # noqa: BLE001 - a corrupt sample must never stop training
                dropped.append((d.key, "decode_error", f"{type(e).__name__}: {e}"))
            streak += not repeat
            if c.max_consecutive_corrupt and streak >= c.max_consecutive_corrupt:
                raise RuntimeError(
                    f"{streak} unreadable samples in a row (data.max_consecutive_corrupt={c.max_consecutive_corrupt}; "
                    f"last: {d.key}, {dropped[-1][1]}: {dropped[-1][2]}): the data, not a clip, is broken"
                )
        return self._collate(items, dropped, batch_id, stream, pixels, stream.retries - retries0)

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._u8 is None or self._u8.shape != shape:
            self._u8 = np.empty(shape, np.uint8)
        return self._u8

    def _decode(self, d: _Drawn, bucket: int, hw: tuple[int, int], slot: np.ndarray | None) -> dict[str, Any]:
        """One sample -> its fields; pixels are decoded into `slot` (its place in the batch tensor)."""
        c = self.cfg
        members = d.members or {}
        try:
            meta, caption = decode_sample(members)
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", str(e)) from None
        stored = int(meta.get("frames") or 0)
        span = (c.num_frames - 1) * c.frame_stride + 1
        if stored and span > stored:
            raise SampleError(
                "too_short", f"clip has {stored} frames, {c.num_frames} x stride {c.frame_stride} needs {span}"
            )
        room = max(0, stored - span)
        if c.clip_start == "random":
            # seeded by the sample's place in its epoch: the same after a resume, whatever the worker
            rng = np.random.default_rng([self.seed, d.epoch, bucket, d.seq_pos])
            start = int(rng.integers(room + 1)) if room else 0
        else:
            start = room // 2 if c.clip_start == "center" else 0
        out: dict[str, Any] = {"key": d.key, "caption": caption, "meta": meta}
        if c.use_latents:
            if EXT_LATENTS not in members:
                raise SampleError("no_latents", "sample has no latents.npy (shard it with --encode-latents)")
            z = npy_load(members[EXT_LATENTS])
            out["latents"] = np.ascontiguousarray(z[:, start : start + span : c.frame_stride], dtype=np.float32)
            if EXT_TEXT_EMB in members:
                out["text_embeds"] = npy_load(members[EXT_TEXT_EMB]).astype(np.float32)
        else:
            if EXT_MP4 not in members:
                raise SampleError("decode_error", "sample has no mp4")
            size = hw if (meta.get("height"), meta.get("width")) != hw else None
            # one decoder thread: parallelism comes from num_workers (FFmpeg's frame threads only add
            # latency on short clips, and oversubscribe the cores the workers already use)
            # float32 slots: decode into a reused uint8 clip buffer, then convert the whole clip (measured
            # 3-6% faster than converting plane by plane between frames, which evicts the decoder's state)
            u8 = slot if slot is None or slot.dtype == np.uint8 else self._scratch(slot.shape)
            decode_window(
                members[EXT_MP4],
                start,
                c.num_frames,
                c.frame_stride,
                size=size,
                threads=1,
                format="mp4",
                channels_first=True,
                out=u8,
                probe_decode=False,
            )  # (C, F, H, W)
            if u8 is not slot:
                u8_to_unit_range(u8, slot)
        return out

    def _collate(
        self,
        items: list[dict[str, Any]],
        dropped: list[tuple[str, str, str]],
        batch_id: int,
        stream: _WorkerStream,
        pixels: torch.Tensor | None,
        retries: int,
    ) -> dict[str, Any]:
        c = self.cfg
        bucket = self.buckets[stream.bucket]
        batch: dict[str, Any] = {
            "keys": [i["key"] for i in items],
            "captions": [i["caption"] for i in items],
            "meta": [i["meta"] for i in items],
            "_dropped": dropped,
            "_batch": batch_id,
            "_bucket": stream.bucket,
            "_consumed": stream.consumed,
            "_retries": retries,
        }
        if bucket.name:
            batch["bucket"] = bucket.name
        if c.use_latents:
            batch["latents"] = torch.from_numpy(np.stack([i["latents"] for i in items])) if items else torch.zeros(0)
            if items and all("text_embeds" in i for i in items):
                batch["text_embeds"] = torch.from_numpy(np.stack([i["text_embeds"] for i in items]))
        else:
            # (B, C, F, H, W) at module boundaries; the samples were decoded into it already
            batch["pixels"] = pixels if len(items) == len(pixels) else pixels[: len(items)]
        return batch


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, pool: BufferPool | None = None) -> torch.Tensor:
    """An uninitialised batch tensor to fill in place. In a DataLoader worker it is allocated in shared
    memory, as torch's default collate does, so handing it to the trainer copies nothing; in the main
    process it comes from the loader's buffer pool (or a plain numpy allocation without one)."""
    if get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
        return proto.new(storage).resize_(*shape)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(pool.take(shape, np_dtype) if pool is not None else np.empty(shape, np_dtype))


def _to_unit_range(u8: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1], in numpy: single-threaded, whatever torch's thread settings."""
    src = u8.numpy()
    out = pool.take(src.shape, np.dtype(np.float32)) if pool is not None else np.empty(src.shape, np.float32)
    u8_to_unit_range(src, out)
    return torch.from_numpy(out)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # already collated; torch's default_convert would walk every nested meta list


# preemption (scancel --signal=TERM, the SLURM time limit) signals every process of the step, loader
# workers included: a worker that died of it would take its rank down ("DataLoader worker ... is killed
# by signal") before the stop checkpoint. Workers ignore them; the main process decides (vldm.train.signals)
# and ends its workers itself. SIGKILL cannot be ignored, and torch ends orphaned workers on its own.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_init(_: int) -> None:
    for s in WORKER_IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    torch.set_num_threads(1)  # decoding is the work; intra-op threads would only oversubscribe the cores


def _end_workers_at_exit() -> None:
    """At interpreter exit, kill the daemonic children (loader workers) still alive. multiprocessing's own exit
    handler ends them with SIGTERM and then joins them: workers that ignore SIGTERM (above) would keep a finished
    run alive forever, its loader still open in the trainer. Registered after multiprocessing's handler, so it
    runs before it (atexit is last in, first out)."""
    # torch's SIGCHLD handler raises in this process when a worker dies of a signal: the run is over, drop it
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    for p in workers:
        p.kill()
    for p in workers:
        p.join(10)


_exit_hook = []  # registered once, when the first loader with workers starts


class ClipLoader:
    """Batches of clips for one rank: iterate it; save `state_dict()` with your checkpoint.

    Each batch is a dict:
      "pixels"      float32 (B, C=3, F=num_frames, H, W) in [-1, 1]   (not with use_latents;
                    uint8 0..255 with pixel_dtype="uint8")
      "latents"     float32 (B, C, F, h, w), already scaled by the VAE's scaling_factor (use_latents)
      "text_embeds" float32 (B, L, D) when the shards carry text embeddings (use_latents)
      "captions"    list[str];  "keys" list[str] (unique sample ids);  "meta" list[dict] (the sample json)
      "bucket"      "HxWxF", the bucket every sample of the batch comes from (bucketed layouts only)

    Training (split="train") iterates forever and every batch has exactly B = batch_size samples. A
    corrupt sample (unreadable or truncated mp4, broken json, clip too short, a shard that stays
    unreadable after `read_retries`...) is logged with its key and reason, counted in `stats["corrupt"]`
    / `stats["corrupt_by_reason"]`, and skipped: its batch is refilled with the next samples of the
    rank's order, so the batch holds exactly what the same order without the corrupt sample would
    have given (never a zero-filled or substituted sample). Every rank yields one batch per request,
    so DDP ranks run the same collectives whatever their data; ranks (and loader workers) are no
    longer at the same place of their epoch once one of them skipped a sample. Each epoch is a new
    seeded order (order.py) and every sample is read at most once per epoch (exactly once when
    world_size divides the sample count); with refill, a batch may span two epochs. `stats["epoch"]`
    counts epochs as samples drawn (corrupt ones included) / samples per rank, so 2.5 = half way
    through the third pass. `len(loader)` is the number of full batches one epoch holds.

    Buckets: when `data.shards` is a bucketed sharder output (urls.py) and `data.buckets` is on, every
    batch comes from one bucket, at that bucket's height x width (data.size / data.width unused), and
    the bucket of batch g is the same on every rank, drawn in proportion to the buckets' sample counts.

    split="holdout" reads the last `holdout_shards` shards (of each bucket) once, in order; with
    `one_pass=True` the train split is read once too (the rank's share of epoch 0). A one-pass
    loader's last batch of each worker and bucket may be short (dropped with drop_last).

    Resume: `load_state_dict(state)` before iterating. With the same world size, workers, batch size,
    shuffle buffer, seed and shards, the next batch is exactly the one the interrupted run would have
    produced next. Otherwise the loader logs the change and starts a fresh epoch order after the
    newest epoch the old state had begun. The state differs by rank: save every rank's.
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        one_pass: bool = False,
    ):
        if not cfg.shards:
            raise ValueError("data.shards is empty: point it at the output of data_prep/shard_videos.py")
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.seed, self.split = cfg, rank, world_size, seed, split
        self.train = split == "train"
        self.endless = self.train and not one_pass
        self.drop_last = cfg.drop_last if self.train else False
        self.buckets = self._buckets(layout(cfg.shards, cfg.buckets, Retry.from_config(cfg)))
        self.per_rank = [samples_per_rank(sum(b.counts), world_size) for b in self.buckets]
        self.num_batches = sum(n // cfg.batch_size for n in self.per_rank)
        self.k = max(1, cfg.num_workers)
        self.epoch0 = 0  # the epoch the streams start at (moves on a change of layout)
        self.batches = 0  # batches yielded since epoch0 began (the schedule position)
        self.consumed = [[0] * self.k for _ in self.buckets]  # samples drawn per bucket and logical worker
        self._stats: Counter = Counter()
        self._reasons: Counter = Counter()
        self._pool = BufferPool()

    def _buckets(self, found: list[Bucket]) -> list[Bucket]:
        c = self.cfg
        keep = []
        span = (c.num_frames - 1) * c.frame_stride + 1
        for b in found:
            n = len(b.urls) - c.holdout_shards
            if n < 1 and self.train:
                where = f"bucket {b.name}" if b.name else f"{len(b.urls)} shards"
                raise ValueError(f"holdout_shards={c.holdout_shards} leaves no training shards ({where})")
            urls, counts = (b.urls[:n], b.counts[:n]) if self.train else (b.urls[n:], b.counts[n:])
            if b.frames and span > b.frames:
                raise ValueError(
                    f"bucket {b.name}: clips have {b.frames} frames, data.num_frames={c.num_frames} x "
                    f"data.frame_stride={c.frame_stride} needs {span}"
                )
            need = self.world_size * c.batch_size if self.train else self.world_size
            if b.name and sum(counts) < need:
                log.warning(
                    "bucket %s skipped: %d samples are too few for %d ranks x batch %d",
                    b.name,
                    sum(counts),
                    self.world_size,
                    c.batch_size,
                )
                continue
            keep.append(Bucket(b.name, urls, counts, b.height, b.width, b.frames))
        total = sum(sum(b.counts) for b in keep)
        if not keep or min(samples_per_rank(sum(b.counts), self.world_size) for b in keep) < (
            c.batch_size if self.train else 1
        ):
            raise ValueError(
                f"{total} samples in {sum(len(b.urls) for b in keep)} shards are too few for {self.world_size} "
                f"ranks x batch {c.batch_size}"
            )
        if keep[0].name:
            log.info(
                "buckets: %s", ", ".join(f"{b.name} ({sum(b.counts)} samples, {len(b.urls)} shards)" for b in keep)
            )
        return keep

    def __len__(self) -> int:
        """Full batches per epoch (the same on every rank)."""
        return self.num_batches

    @property
    def num_samples(self) -> int:
        return sum(sum(b.counts) for b in self.buckets)

    @property
    def epochs(self) -> float:
        """Passes over this rank's share: samples drawn (corrupt ones included) / samples per rank."""
        return self.epoch0 + sum(map(sum, self.consumed)) / sum(self.per_rank)

    @property
    def epoch(self) -> int:
        return int(self.epochs)

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "epoch": self.epochs,
            "batches_per_epoch": self.num_batches,
            "batches": self._stats["batches"],
            "samples": self._stats["samples"],
            "corrupt": self._stats["corrupt"],
            "corrupt_by_reason": dict(self._reasons),
            "shard_retries": self._stats["shard_retries"],
        }

    def _layout(self) -> dict[str, Any]:
        names = hashlib.sha1(
            json.dumps(
                [[b.name, [[u.rsplit("/", 1)[-1], n] for u, n in zip(b.urls, b.counts)]] for b in self.buckets]
            ).encode()
        ).hexdigest()
        c = self.cfg
        return {
            "world_size": self.world_size,
            "num_workers": c.num_workers,
            "batch_size": c.batch_size,
            "shuffle_buffer": c.shuffle_buffer,
            "seed": self.seed,
            "split": self.split,
            "shards": names,
        }

    def _fresh_epoch(self) -> int:
        """The first epoch no stream has begun: where a new order starts after a change of layout."""
        newest = self.epoch0
        for b, n in enumerate(self.per_rank):
            for w in range(self.k):
                e, i = locate(n, self.k, w, self.epoch0, self.consumed[b][w])
                newest = max(newest, e + (1 if i else 0))
        return newest

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch0": self.epoch0,
            "batches": self.batches,
            "consumed": [list(c) for c in self.consumed],
            "fresh_epoch": self._fresh_epoch(),
            "epochs": self.epochs,
            "layout": self._layout(),
            "stats": dict(self._stats),
            "corrupt_by_reason": dict(self._reasons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stats = Counter(state.get("stats", {}))
        self._reasons = Counter(state.get("corrupt_by_reason", {}))
        old, new = state["layout"], self._layout()
        if state.get("version") == STATE_VERSION and old == new:
            self.epoch0, self.batches = int(state["epoch0"]), int(state["batches"])
            self.consumed = [list(map(int, c)) for c in state["consumed"]]
            return
        if state.get("version") == STATE_VERSION:
            changed = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
            fresh = int(state["fresh_epoch"])
        else:  # version 1 (batches in lockstep): epoch, batch_in_epoch
            changed = f"loader state version {state.get('version')} -> {STATE_VERSION}"
            fresh = int(state["epoch"]) + (1 if state.get("batch_in_epoch") else 0)
        self.epoch0, self.batches = fresh, 0
        self.consumed = [[0] * self.k for _ in self.buckets]
        log.warning(
            "data loader layout changed (%s): the exact position cannot be carried over; starting a fresh epoch "
            "order at epoch %d",
            changed,
            self.epoch0,
        )

    def _source(self) -> _Source:
        c = self.cfg
        return _Source(
            self.buckets,
            c,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            epoch0=self.epoch0,
            batch0=self.batches,
            consumed=[list(x) for x in self.consumed],
            shuffle=self.train,
            endless=self.endless,
            drop_last=self.drop_last,
            pool=None if c.num_workers else self._pool,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        c = self.cfg
        if c.num_workers and not _exit_hook:
            _exit_hook.append(atexit.register(_end_workers_at_exit))
        dl = DataLoader(
            self._source(),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=c.num_workers,
            worker_init_fn=_worker_init if c.num_workers else None,
            prefetch_factor=2 if c.num_workers else None,
            persistent_workers=False,
        )
        for raw in dl:
            g, b, consumed = raw.pop("_batch"), raw.pop("_bucket"), raw.pop("_consumed")
            if self.endless:
                if g != self.batches:  # DataLoader's round robin is what makes resume exact
                    raise RuntimeError(f"loader order broken: got batch {g}, expected {self.batches}")
                self.consumed[b][g % self.k] = consumed
                self.batches += 1
            yield self._finish(raw)

    def _finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        px = raw.get("pixels")
        if px is not None and px.dtype == torch.uint8 and self.cfg.pixel_dtype == "float32":
            raw["pixels"] = _to_unit_range(px, self._pool)
        dropped = raw.pop("_dropped")
        for _key, reason, _ in dropped:
            self._stats["corrupt"] += 1
            self._reasons[reason] += 1
        # one line per sample; a run of one failure (a shard that stayed unreadable) in one line
        i = 0
        while i < len(dropped):
            j = i
            while j + 1 < len(dropped) and dropped[j + 1][1:] == dropped[i][1:]:
                j += 1
            key, reason, msg = dropped[i]
            if j == i:
                log.warning("skipped corrupt sample %s (%s): %s", key, reason, msg)
            else:
                keys = [d[0] for d in dropped[i : j + 1]]
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
                log.warning("skipped %d corrupt samples %s (%s): %s", len(keys), shown, reason, msg)
            i = j + 1
        self._stats["shard_retries"] += raw.pop("_retries")
        self._stats["batches"] += 1
        self._stats["samples"] += len(raw["keys"])
        return raw


def build_loader(
    data_cfg: DataConfig,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    split: str = "train",
    one_pass: bool = False,
) -> ClipLoader:
    """The trainer's entry point: a `ClipLoader` for this rank (see its docstring for the batch format,
    epochs, corrupt samples, buckets and resume). `rank`/`world_size` are the data-parallel ones: the
    loader splits shards by rank itself (no environment variables read), and by worker inside the rank."""
    return ClipLoader(data_cfg, rank=rank, world_size=world_size, seed=seed, split=split, one_pass=one_pass)

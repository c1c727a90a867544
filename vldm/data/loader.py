"""The training loader over vldm shards: `build_loader(cfg.data, rank, world_size, seed)`.

Why not `webdataset.WebDataset`: the shards are WebDataset-compatible, but training here needs two
things its pipelines don't give together: exact mid-epoch resume (no sample repeated or skipped,
with a shuffle buffer and several workers) and, under DDP, the same number of batches on every rank
while each sample is still read once per epoch (resampled shards + with_epoch give equal counts but
not coverage). order.py makes the sample order a pure function of the seed, epoch and layout; this
module reads it (streaming, no seeks: local files, fsspec URLs and pipe: commands all work).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vldm.config.data import DataConfig
from vldm.data.codec import decode_window, u8_to_unit_range
from vldm.data.format import EXT_LATENTS, EXT_MP4, EXT_TEXT_EMB, decode_sample
from vldm.data.latents import npy_load
from vldm.data.order import Segment, WorkerPlan, batches_per_epoch, worker_plan
from vldm.data.tario import iter_samples
from vldm.data.urls import expand, open_shard, sample_counts

log = logging.getLogger("vldm.data")
STATE_VERSION = 1


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
    until asked for, which the shuffle-buffer order bounds to `shuffle_buffer` entries."""

    def __init__(self, urls: list[str], segments: list[Segment], skip: set[int]):
        self.urls, self.segments, self.skip = urls, segments, skip
        self.ready: dict[int, tuple[str, dict[str, bytes] | None, SampleError | None]] = {}
        self._it = self._stream()

    def _stream(self) -> Iterator[tuple[int, str, dict[str, bytes] | None, SampleError | None]]:
        base = 0  # position of the current segment's first sample
        for seg in self.segments:
            url = self.urls[seg.shard]

            def want(i: int, seg: Segment = seg, base: int = base) -> bool:
                return seg.begin <= i < seg.end and base + i - seg.begin not in self.skip

            got = 0
            try:
                with open_shard(url) as f:
                    for i, key, members in iter_samples(f, want=want, stop=seg.end):
                        if i >= seg.begin:
                            yield base + got, key, members, None
                            got += 1
                err = SampleError("missing", f"{url} has fewer samples than indexed ({seg.begin + got} < {seg.end})")
            except Exception as e:  # unreadable / truncated shard: the rest of the segment is lost
                err = SampleError("shard_error", f"{url}: {type(e).__name__}: {e}")
            for _ in range(seg.end - seg.begin - got):
                yield base + got, f"{url.rsplit('/', 1)[-1]}#{seg.begin + got}", None, err
                got += 1
            base += seg.end - seg.begin

    def get(self, pos: int) -> tuple[str, dict[str, bytes] | None, SampleError | None]:
        while pos not in self.ready:
            p, key, members, err = next(self._it)
            if p not in self.skip:
                self.ready[p] = (key, members, err)
        return self.ready.pop(pos)


class _EpochStream(IterableDataset):
    """One epoch of one rank from batch `skip_batches` on; yields collated batches (uint8 pixels)."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        cfg: DataConfig,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        skip_batches: int,
        shuffle: bool,
        drop_last: bool,
        pool: BufferPool | None = None,
    ):
        super().__init__()
        self.pool = pool  # main process only (num_workers=0): workers allocate shared memory per batch
        self._u8: np.ndarray | None = None  # the clip buffer float32 batches are decoded through
        self.urls, self.counts, self.cfg = urls, counts, cfg
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.skip_batches, self.shuffle, self.drop_last = skip_batches, shuffle, drop_last

    def plan(self, worker: int) -> WorkerPlan:
        c = self.cfg
        return worker_plan(
            self.counts,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=c.num_workers,
            worker=worker,
            batch_size=c.batch_size,
            drop_last=self.drop_last,
            shuffle_buffer=c.shuffle_buffer if self.shuffle else 0,
            shuffle=self.shuffle,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k = max(1, self.cfg.num_workers)
        # DataLoader asks its workers round robin from worker 0, so after a resume at batch s the
        # process that starts must hold batch s: rotate which part each process reads
        plan = self.plan(((info.id if info is not None else 0) + self.skip_batches) % k)
        done = sum(1 for j in plan.batch_ids if j < self.skip_batches)
        t = sum(plan.batch_sizes[:done])
        reader = _Reader(self.urls, plan.segments, set(plan.order[:t]))
        c = self.cfg
        # pixels go straight into the batch tensor (slot = samples kept so far; a dropped sample's slot is
        # overwritten by the next one). uint8 from worker processes (shared memory is freshly allocated
        # for every batch, and its page faults cost more than the conversion): ClipLoader converts them.
        u8 = c.pixel_dtype == "uint8" or info is not None
        for b in range(done, len(plan.batch_sizes)):
            items, dropped = [], []
            batch_px = (
                None
                if c.use_latents
                else _batch_tensor(
                    (plan.batch_sizes[b], 3, c.num_frames, *c.hw), torch.uint8 if u8 else torch.float32, self.pool
                )
            )
            for pos in plan.order[t : t + plan.batch_sizes[b]]:
                key, members, err = reader.get(pos)
                try:
                    if err is not None:
                        raise err
                    slot = None if batch_px is None else batch_px.numpy()[len(items)]
                    items.append(self._decode(key, members, plan.offset + pos, slot))
                except SampleError as e:
                    dropped.append((key, e.reason, str(e)))
                except Exception as e:  # a corrupt sample must never stop training
                    dropped.append((key, "decode_error", f"{type(e).__name__}: {e}"))
            t += plan.batch_sizes[b]
            yield self._collate(items, dropped, plan.batch_ids[b], batch_px)

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._u8 is None or self._u8.shape != shape:
            self._u8 = np.empty(shape, np.uint8)
        return self._u8

    def _decode(
        self, key: str, members: dict[str, bytes], seq_pos: int, slot: np.ndarray | None = None
    ) -> dict[str, Any]:
        """One sample -> its fields; pixels are decoded into `slot` (its place in the batch tensor)."""
        c = self.cfg
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
            # seeded by the sample's place in the epoch: the same after a resume, whatever the worker
            start = int(np.random.default_rng([self.seed, self.epoch, seq_pos]).integers(room + 1)) if room else 0
        else:
            start = room // 2 if c.clip_start == "center" else 0
        out: dict[str, Any] = {"key": key, "caption": caption, "meta": meta}
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
            size = c.hw if (meta.get("height"), meta.get("width")) != c.hw else None
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
        pixels: torch.Tensor | None,
    ) -> dict[str, Any]:
        c = self.cfg
        batch: dict[str, Any] = {
            "keys": [i["key"] for i in items],
            "captions": [i["caption"] for i in items],
            "meta": [i["meta"] for i in items],
            "_dropped": dropped,
            "_batch": batch_id,
            "_epoch": self.epoch,
        }
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is the work; intra-op threads would only oversubscribe the cores


class ClipLoader:
    """Batches of clips for one rank: iterate it; save `state_dict()` with your checkpoint.

    Each batch is a dict:
      "pixels"      float32 (B, C=3, F=num_frames, H, W) in [-1, 1]   (not with use_latents;
                    uint8 0..255 with pixel_dtype="uint8")
      "latents"     float32 (B, C, F, h, w), already scaled by the VAE's scaling_factor (use_latents)
      "text_embeds" float32 (B, L, D) when the shards carry text embeddings (use_latents)
      "captions"    list[str];  "keys" list[str] (unique sample ids);  "meta" list[dict] (the sample json)
    B == batch_size except: the epoch's last batch when drop_last is off, and batches from which a
    corrupt sample was dropped (B == 0 only if all of a batch's samples are corrupt). A corrupt sample
    (unreadable mp4, broken json, truncated shard...) is logged, counted in `stats["corrupt"]` /
    `stats["corrupt_by_reason"]` and dropped from its batch; it is never fatal and never silently
    replaced. Dropping keeps the number of batches per epoch fixed, so every rank yields exactly
    `len(loader)` batches per epoch (DDP-safe: no rank waits).

    Training (split="train") iterates forever, epoch after epoch (`loader.epoch`), each epoch a new
    seeded order; every sample is read at most once per epoch (exactly once when world_size divides
    the sample count and, with drop_last, batch_size divides the per-rank share). split="holdout"
    reads the last `holdout_shards` shards once, in order.

    Resume: `load_state_dict(state)` before iterating. With the same world size, workers, batch size,
    shuffle buffer, seed and shards, the next batch is exactly the one the interrupted run would have
    produced next. Otherwise the loader logs the change and starts a fresh epoch order at the next
    epoch. Ranks are in the same position at the same step, so rank 0's state is valid for all.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"):
        if not cfg.shards:
            raise ValueError("data.shards is empty: point it at the output of data_prep/shard_videos.py")
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        urls = expand(cfg.shards)
        keep = len(urls) - cfg.holdout_shards
        if keep < 1 and split == "train":
            raise ValueError(f"holdout_shards={cfg.holdout_shards} leaves no training shards (of {len(urls)})")
        self.urls = urls[:keep] if split == "train" else urls[keep:]
        self.counts = sample_counts(self.urls)
        self.cfg, self.rank, self.world_size, self.seed, self.split = cfg, rank, world_size, seed, split
        self.train = split == "train"
        self.drop_last = cfg.drop_last if self.train else False
        self.num_batches = batches_per_epoch(sum(self.counts), world_size, cfg.batch_size, self.drop_last)
        if self.num_batches == 0:
            raise ValueError(
                f"{sum(self.counts)} samples in {len(self.urls)} shards are too few for {world_size} ranks x "
                f"batch {cfg.batch_size}{' (drop_last)' if self.drop_last else ''}"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stats: Counter = Counter()
        self._reasons: Counter = Counter()
        self._pool = BufferPool()

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.num_batches

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "batches_per_epoch": self.num_batches,
            "batches": self._stats["batches"],
            "samples": self._stats["samples"],
            "corrupt": self._stats["corrupt"],
            "corrupt_by_reason": dict(self._reasons),
        }

    def _layout(self) -> dict[str, Any]:
        names = hashlib.sha1(
            json.dumps([[u.rsplit("/", 1)[-1], n] for u, n in zip(self.urls, self.counts)]).encode()
        ).hexdigest()
        c = self.cfg
        return {
            "world_size": self.world_size,
            "num_workers": c.num_workers,
            "batch_size": c.batch_size,
            "drop_last": self.drop_last,
            "shuffle_buffer": c.shuffle_buffer,
            "seed": self.seed,
            "split": self.split,
            "shards": names,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "layout": self._layout(),
            "stats": dict(self._stats),
            "corrupt_by_reason": dict(self._reasons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stats = Counter(state.get("stats", {}))
        self._reasons = Counter(state.get("corrupt_by_reason", {}))
        old, new = state["layout"], self._layout()
        if old == new:
            self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
            return
        changed = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
        self.epoch = int(state["epoch"]) + (1 if state["batch_in_epoch"] else 0)
        self.batch_in_epoch = 0
        log.warning(
            "data loader layout changed (%s): the exact position cannot be carried over; starting a fresh epoch "
            "order at epoch %d",
            changed,
            self.epoch,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._epoch()
            if not self.train:
                return

    def _epoch(self) -> Iterator[dict[str, Any]]:
        c = self.cfg
        if self.batch_in_epoch < self.num_batches:
            ds = _EpochStream(
                self.urls,
                self.counts,
                c,
                seed=self.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
                skip_batches=self.batch_in_epoch,
                shuffle=self.train,
                drop_last=self.drop_last,
                pool=None if c.num_workers else self._pool,
            )
            dl = DataLoader(
                ds,
                batch_size=None,
                collate_fn=_as_is,
                num_workers=c.num_workers,
                worker_init_fn=_worker_init if c.num_workers else None,
                prefetch_factor=2 if c.num_workers else None,
                persistent_workers=False,
            )
            for raw in dl:
                if raw["_batch"] != self.batch_in_epoch:  # DataLoader's round robin is what makes resume exact
                    raise RuntimeError(
                        f"loader order broken: got batch {raw['_batch']}, expected {self.batch_in_epoch}"
                    )
                batch = self._finish(raw)
                self.batch_in_epoch += 1
                yield batch
        if self.train:
            self.epoch += 1
            self.batch_in_epoch = 0

    def _finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        px = raw.get("pixels")
        if px is not None and px.dtype == torch.uint8 and self.cfg.pixel_dtype == "float32":
            raw["pixels"] = _to_unit_range(px, self._pool)
        for key, reason, msg in raw.pop("_dropped"):
            self._stats["corrupt"] += 1
            self._reasons[reason] += 1
            log.warning("skipped corrupt sample %s (%s): %s", key, reason, msg)
        raw.pop("_batch")
        raw.pop("_epoch")
        self._stats["batches"] += 1
        self._stats["samples"] += len(raw["keys"])
        return raw


def build_loader(
    data_cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"
) -> ClipLoader:
    """The trainer's entry point: a `ClipLoader` for this rank (see its docstring for the batch format,
    epochs, corrupt samples and resume). `rank`/`world_size` are the data-parallel ones: the loader
    splits shards by rank itself (no environment variables read), and by worker inside the rank."""
    return ClipLoader(data_cfg, rank=rank, world_size=world_size, seed=seed, split=split)

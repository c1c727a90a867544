"""Aspect/length buckets in the loader (issue 14, loader side): the bucketed sharder layout (OUTPUT/<HxWxF>/
shards + a top-level _shards.json with "buckets"), built here by running today's sharder into one
directory per bucket. Every batch comes from one bucket at its own size, the same bucket on every rank
at every batch, in proportion to the buckets' sample counts, every sample once per epoch, exact resume."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_data_loader import shard_corpus, take

from vldm.config.data import DataConfig, SyntheticConfig
from vldm.data import build_loader
from vldm.data.synthetic import write_corpus
from vldm.data.tario import read_all

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
# bucket -> videos (4 clips of 8 frames each): 48 and 16 samples
BUCKETS = {"32x32x8": 12, "32x48x8": 4}


def write_bucketed(root: Path, buckets: dict[str, int]) -> Path:
    """Today's sharder once per bucket into OUTPUT/<bucket>/, and the top-level index of the contract."""
    out = root / "shards"
    index: dict = {"buckets": {}, "shards": []}
    for i, (name, videos) in enumerate(buckets.items()):
        h, w, f = (int(v) for v in name.split("x"))
        src = root / f"videos_{name}"
        write_corpus(SyntheticConfig(output=str(src), count=videos, size=f"{h}x{w}", frames=32, fps=8, seed=10 + i))
        shard_corpus(src, out / name, videos_per_shard=2, frames=f, fps=8, size=f"{h}x{w}")
        index["buckets"][name] = {"height": h, "width": w, "frames": f}
        for s in json.loads((out / name / "_shards.json").read_text())["shards"]:
            index["shards"].append({**s, "name": f"{name}/{s['name']}", "bucket": name})
    (out / "_shards.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> Path:
    return write_bucketed(tmp_path_factory.mktemp("buckets"), BUCKETS)


def keys_of(path: Path) -> set[str]:
    return {k for p in sorted(path.glob("*.tar")) for k, _ in read_all(str(p))}


def cfg_for(path: Path, **kw) -> DataConfig:
    base = dict(shards=str(path), num_frames=4, frame_stride=2, size=64, batch_size=2, num_workers=2, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


def test_every_batch_is_one_bucket_the_same_on_every_rank_in_proportion_and_every_sample_once(bucketed):
    by_bucket = {name: keys_of(bucketed / name) for name in BUCKETS}
    assert [len(v) for v in by_bucket.values()] == [48, 16]
    cfg = cfg_for(bucketed)
    # per rank 24 and 8 samples; a round is 2 workers x batch 2 = 4 samples of one bucket: 6 + 2 rounds per
    # epoch, so 16 batches are exactly one epoch of both buckets
    loaders = [build_loader(cfg, rank=r, world_size=2, seed=11) for r in range(2)]
    assert len(loaders[0]) == 16
    epochs = [take(ld, 32) for ld in loaders]
    for g in range(32):
        names = {epochs[r][g]["bucket"] for r in range(2)}
        assert len(names) == 1, (g, names)  # the same bucket on every rank at every batch
        (name,) = names
        h, w, _ = (int(v) for v in name.split("x"))
        for r in range(2):
            b = epochs[r][g]
            assert b["pixels"].shape == (2, 3, 4, h, w)  # the bucket's own size: data.size is not used
            assert set(b["keys"]) <= by_bucket[name] and all(m["height"] == h and m["width"] == w for m in b["meta"])
    sequence = [b["bucket"] for b in epochs[0]]
    assert sequence[:16] != sequence[16:]  # each epoch a new bucket order ...
    for half in (sequence[:16], sequence[16:]):
        assert Counter(half) == {"32x32x8": 12, "32x48x8": 4}  # ... with the buckets' shares exactly
        assert all(half[i] == half[i + 1] for i in range(0, 16, 2))  # rounds: K consecutive batches, one bucket
    for e in (0, 1):
        seen = [k for r in range(2) for b in epochs[r][16 * e : 16 * (e + 1)] for k in b["keys"]]
        assert len(seen) == len(set(seen)) == 64 and set(seen) == by_bucket["32x32x8"] | by_bucket["32x48x8"]


@pytest.mark.parametrize("workers,stop", [(2, 5), (0, 9)])
def test_bucketed_resume_continues_exactly(bucketed, workers, stop):
    cfg = cfg_for(bucketed, num_workers=workers, clip_start="random", pixel_dtype="uint8")
    full = take(build_loader(cfg, rank=1, world_size=2, seed=4), 20)
    first = build_loader(cfg, rank=1, world_size=2, seed=4)
    head = take(first, stop)
    resumed = build_loader(cfg, rank=1, world_size=2, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 20 - stop)
    assert [(b["bucket"], b["keys"]) for b in head + tail] == [(b["bucket"], b["keys"]) for b in full]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(head + tail, full))


def test_buckets_off_or_one_bucket_directory_read_as_a_flat_layout(bucketed):
    off = build_loader(cfg_for(bucketed, buckets=False, size=32, num_workers=0), seed=0)
    batches = take(off, len(off))
    assert len(off) == 32 and all("bucket" not in b and b["pixels"].shape == (2, 3, 4, 32, 32) for b in batches)
    assert {k for b in batches for k in b["keys"]} == keys_of(bucketed / "32x32x8") | keys_of(bucketed / "32x48x8")
    one = build_loader(cfg_for(bucketed / "32x48x8", size=32, width=48, num_workers=0), seed=0)
    assert len(one) == 8 and {k for b in take(one, 8) for k in b["keys"]} == keys_of(bucketed / "32x48x8")


def test_a_bucket_too_short_for_the_clip_length_is_refused_by_name(bucketed):
    with pytest.raises(
        ValueError, match=r"bucket 32x32x8: clips have 8 frames, data.num_frames=5 x data.frame_stride=2"
    ):
        build_loader(replace(cfg_for(bucketed), num_frames=5), seed=0)

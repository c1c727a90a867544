"""The training loader: a shard written is a shard read, splitting, exact resume, corrupt samples, URL forms."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vldm.config.data import DataConfig, ShardConfig, SyntheticConfig
from vldm.data import build_loader
from vldm.data.clips import ClipSpec
from vldm.data.codec import decode_all
from vldm.data.format import CLIP_META_FIELDS, is_valid_key
from vldm.data.order import BucketSchedule, locate, part_sizes, worker_part
from vldm.data.plan import make_plan
from vldm.data.report import aggregate
from vldm.data.shards import write_shard
from vldm.data.sources import list_inputs
from vldm.data.synthetic import make_video, write_corpus
from vldm.data.tario import SampleWriter, read_all


def shard_corpus(src: Path, out: Path, videos_per_shard: int, **shard_kw) -> ShardConfig:
    """The sharder's plain functions, no Ray: plan, write every shard, aggregate."""
    cfg = ShardConfig(input=str(src), output=str(out), videos_per_shard=videos_per_shard, **shard_kw)
    out.mkdir(parents=True, exist_ok=True)
    records, dups = list_inputs(cfg.input, ("mp4",))
    spec = ClipSpec.from_config(cfg)
    plan = make_plan(cfg, records, dups, spec)
    for i in range(plan.num_shards):
        write_shard(out, plan.shard_name(i), plan.shard_inputs(i), spec, run_id="t")
    aggregate(out, plan, {"run_id": "t", "elapsed": 1.0})
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """22 videos x 4 clips = 88 samples in 5 shards of unequal size (20, 20, 20, 20, 8)."""
    root = tmp_path_factory.mktemp("loader")
    write_corpus(SyntheticConfig(output=str(root / "videos"), count=22, size="32", frames=32, fps=8, seed=1))
    shard_corpus(root / "videos", root / "shards", videos_per_shard=5, frames=8, fps=8, size="32")
    return root / "shards"


def cfg_for(path: Path, **kw) -> DataConfig:
    base = dict(shards=str(path), num_frames=4, frame_stride=2, size=32, batch_size=4, num_workers=0, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_round_trip_video_to_shards_to_loader(tmp_path):
    """Synthetic video (16 fps, 64 px) -> shards (8 fps clips) -> loader: frames match the source
    frames at the clip's timestamps within codec tolerance, and the metadata is right."""
    syn = SyntheticConfig(output=str(tmp_path / "videos"), count=6, size="64", frames=32, fps=16, seed=7)
    write_corpus(syn)
    shard_corpus(tmp_path / "videos", tmp_path / "shards", videos_per_shard=3, frames=8, fps=8, size="64", crf=18)
    cfg = DataConfig(
        shards=str(tmp_path / "shards"),
        num_frames=8,
        frame_stride=1,
        size=64,
        batch_size=3,
        shuffle_buffer=0,
        clip_start="start",
        drop_last=False,
    )
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    assert loader.num_samples == 6 * 2  # 2 s of video -> two 1 s clips each
    scores, rendered, seen = [], [], set()
    for batch in take(loader, len(loader)):
        px = batch["pixels"]
        assert px.dtype == torch.float32 and px.shape[1:] == (3, 8, 64, 64) and -1 <= px.min() and px.max() <= 1
        for i, meta in enumerate(batch["meta"]):
            seen.add(batch["keys"][i])
            index = int(Path(meta["source"]).stem.split("_")[1])
            frames, side = make_video(syn, index)
            assert (
                set(CLIP_META_FIELDS) <= set(meta)
                and is_valid_key(batch["keys"][i])
                and meta["key"] == batch["keys"][i]
            )
            assert batch["captions"][i] == meta["caption"] == side["caption"]
            assert (meta["fps"], meta["frames"], meta["height"], meta["width"]) == (8.0, 8, 64, 64)
            assert (meta["source_fps"], meta["source_width"], meta["source_height"], meta["source_codec"]) == (
                16.0,
                64,
                64,
                "h264",
            )
            assert meta["end"] - meta["start"] == 1.0 and meta["start"] == meta["clip"] * 1.0
            assert meta["source_size"] == Path(meta["source"]).stat().st_size
            assert meta["meta"]["shapes"] == side["shapes"]  # the sidecar json rides along
            # 16 fps source, 8 fps clip: clip frame j is source frame 2 * (8 * start + j)
            picks = [2 * (8 * meta["clip"] + j) for j in range(8)]
            got = ((px[i].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255)
            scores.append(psnr(got, decode_all(meta["source"])[picks]))  # what the sharder was given
            rendered.append(psnr(got, frames[picks]))  # before the source's own encoding too
    assert len(seen) == 12
    assert min(scores) > 30, scores
    assert min(rendered) > 27, rendered  # two lossy 4:2:0 encodes of saturated colour edges at 64 px


def test_order_is_a_partition_and_worker_streams_stay_in_step():
    """Per epoch the ranks' worker parts partition the epoch's samples (each read at most once; exactly
    once when the world size divides them), every part is shuffled in place, over K epochs every worker
    reads the same number of samples, and `locate` finds the place of any consumed count in the stream."""
    counts = [20, 20, 20, 20, 8, 13]
    for world in (1, 2, 3):
        n = sum(counts) // world
        for workers in (1, 2, 3):
            for epoch in range(4):
                seen = []
                for rank in range(world):
                    for w in range(workers):
                        p = worker_part(
                            counts,
                            seed=0,
                            epoch=epoch,
                            rank=rank,
                            world_size=world,
                            num_workers=workers,
                            worker=w,
                            shuffle_buffer=5,
                        )
                        assert sorted(p.order) == list(range(p.size)) and p.size in (n // workers, n // workers + 1)
                        seen += [(s.shard, i) for s in p.segments for i in range(s.begin, s.end)]
                assert len(seen) == len(set(seen)) == n * world  # no sample twice, none left out but the remainder
            for w in range(workers):
                sizes = [part_sizes(n, workers, e)[w] for e in range(7, 7 + workers)]
                assert sum(sizes) == n  # no worker's stream drifts ahead of another's
                walked = [(e, i) for e in range(3, 3 + 2 * workers) for i in range(part_sizes(n, workers, e)[w])]
                assert [locate(n, workers, w, 3, t) for t in range(len(walked))] == walked


def test_bucket_schedule_is_proportional_and_the_same_for_every_rank():
    """The bucket of round j is a pure function of (seed, epoch0, j); block k holds each bucket's share
    of rounds (its samples per rank / (batch x workers)), exact over every block boundary."""
    per_rank, batch, workers = [40, 16, 9], 2, 2  # 10, 4 and 2.25 rounds per block
    a = BucketSchedule(per_rank, batch, workers, seed=3, epoch0=0)
    b = BucketSchedule(per_rank, batch, workers, seed=3, epoch0=0)
    seq = [a.bucket(r) for r in range(200)]
    assert seq == [b.bucket(r) for r in reversed(range(200))][::-1]  # no hidden state: any query order
    assert seq != [BucketSchedule(per_rank, batch, workers, seed=4, epoch0=0).bucket(r) for r in range(200)]
    start = 0
    for k in range(8):
        size = sum(a.rounds_in_block(k))
        block = seq[start : start + size]
        assert [block.count(i) for i in range(3)] == a.rounds_in_block(k)
        start += size
        assert [seq[:start].count(i) for i in range(3)] == [((k + 1) * n) // (batch * workers) for n in per_rank]
    assert BucketSchedule([7], 1, 3, seed=0, epoch0=5).bucket(10**6) == 0


def test_ranks_and_workers_cover_every_sample_once_per_epoch(shards):
    all_keys = {k for p in sorted(shards.glob("*.tar")) for k, _ in read_all(str(p))}
    assert len(all_keys) == 88
    for world, workers in ((2, 2), (4, 0)):
        # 44 (22) samples per rank: worker parts of 22 hold whole batches of 2, so one epoch is len(loader) batches
        cfg = cfg_for(shards, num_workers=workers, batch_size=2)
        loaders = [build_loader(cfg, rank=r, world_size=world, seed=3) for r in range(world)]
        assert len({len(ld) for ld in loaders}) == 1  # every rank the same number of batches (DDP)
        per_rank = [[k for b in take(ld, len(ld)) for k in b["keys"]] for ld in loaders]
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)) == 88 and set(flat) == all_keys
        # the next epoch is a different order of the same samples
        epoch2 = [k for b in take(loaders[0], len(loaders[0])) for k in b["keys"]]
        assert epoch2 != per_rank[0] and len(set(epoch2)) == len(epoch2) and loaders[0].epochs == 2.0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,stop", [(2, 7), (3, 4), (0, 11)])
def test_resume_continues_exactly_where_it_stopped(shards, workers, stop):
    cfg = cfg_for(shards, num_workers=workers, clip_start="random")
    full = take(build_loader(cfg, rank=1, world_size=2, seed=5), 16)  # 11 batches per epoch: crosses into epoch 1
    first = build_loader(cfg, rank=1, world_size=2, seed=5)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
    resumed = build_loader(cfg, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    tail = take(resumed, 16 - stop)
    assert [b["keys"] for b in head + tail] == [b["keys"] for b in full]
    for a, b in zip(head + tail, full):
        assert torch.equal(a["pixels"], b["pixels"])  # same random clip windows too
    assert resumed.stats["batches"] == 16 and resumed.epoch == 1


def test_other_world_size_starts_a_fresh_epoch_and_says_so(shards, caplog):
    cfg = cfg_for(shards)
    two = build_loader(cfg, rank=0, world_size=2, seed=0)
    take(two, 3)
    one = build_loader(cfg, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        one.load_state_dict(two.state_dict())
    assert "world_size 2 -> 1" in caplog.text and "fresh epoch" in caplog.text
    assert one.epochs == 1.0 and one.state_dict()["consumed"] == [[0]]
    fresh = build_loader(cfg, rank=0, world_size=1, seed=0)
    take(fresh, len(fresh))  # one whole epoch: the next batch is epoch 1's first
    assert take(one, 1)[0]["keys"] == take(fresh, 1)[0]["keys"]


def test_corrupt_samples_are_skipped_counted_and_never_replaced(shards, tmp_path, caplog):
    """A corrupt sample is skipped and its batch refilled from the rank's order: the batches are those
    of the same order without it (same keys, same pixels), never short, never padded."""
    bad = tmp_path / "bad"
    bad.mkdir()
    samples = read_all(str(shards / "shard-000000.tar"))
    broken = {samples[3][0]: "mp4", samples[7][0]: "json", samples[12][0]: "cut"}
    with open(bad / "shard-000000.tar", "wb") as f:
        w = SampleWriter(f)
        for key, m in samples:
            m = dict(m)
            if broken.get(key) == "mp4":
                m["mp4"] = b"\x00\x00\x00\x18ftypisom" + bytes(500)
            if broken.get(key) == "json":
                m["json"] = b"{not json"
            if broken.get(key) == "cut":
                m["mp4"] = m["mp4"][: len(m["mp4"]) // 3]  # a truncated member inside a valid tar
            w.write(key, m)
        w.close()
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(shards / "shard-000000.tar", clean)
    cfg = cfg_for(bad, shuffle_buffer=6)
    loader = build_loader(cfg, seed=0)
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        batches = take(loader, len(loader))
    assert [len(b["keys"]) for b in batches] == [4] * 5 and all(b["pixels"].shape[0] == 4 for b in batches)
    drawn = sum(map(sum, loader.consumed))  # samples of the order read: the 20 trained on + the skipped ones
    order = [
        (k, px)
        for b in take(build_loader(replace(cfg, shards=str(clean)), seed=0), 7)
        for k, px in zip(b["keys"], b["pixels"])
    ][:drawn]
    expected = [(k, px) for k, px in order if k not in broken]
    got = [(k, px) for b in batches for k, px in zip(b["keys"], b["pixels"])]
    assert [k for k, _ in got] == [k for k, _ in expected]  # 17 of epoch 0, then epoch 1's first ones
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
    skipped = [broken[k] for k, _ in order if k in broken]
    assert len(skipped) >= 3 and drawn == 20 + len(skipped) and loader.stats["corrupt"] == len(skipped)
    assert loader.stats["corrupt_by_reason"] == {
        "decode_error": skipped.count("mp4") + skipped.count("cut"),
        "bad_json": skipped.count("json"),
    }
    assert all(k in caplog.text for k in broken) and "(bad_json)" in caplog.text
    # a shard cut short after it was indexed: retried, then the rest of it is counted; batches stay full
    (bad / "shard-000000.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[:30000])
    shutil.copy(shards / "_shards.json", bad)
    loader = build_loader(replace(cfg, read_retries=1, retry_backoff_s=0.01), seed=0)
    readable = {k for k, _ in read_all_prefix(bad / "shard-000000.tar")}
    batches = take(loader, 3)
    keys = [k for b in batches for k in b["keys"]]
    assert [len(b["keys"]) for b in batches] == [4, 4, 4] and set(keys) <= readable and 0 < len(readable) < 20
    drawn = sum(map(sum, loader.consumed))
    assert loader.stats["corrupt_by_reason"] == {"shard_error": drawn - 12} and loader.stats["shard_retries"] >= 1


def read_all_prefix(path: Path) -> list[tuple[str, dict]]:
    """The samples of a damaged tar that can be read before the damage (a sample is only yielded whole)."""
    import tarfile

    from vldm.data.tario import iter_samples

    out = []
    with open(path, "rb") as f:
        try:
            for _, k, m in iter_samples(f):
                out.append((k, m))
        except (tarfile.ReadError, OSError):
            pass
    return out


def test_every_shard_url_form_reads_the_same_samples(shards, tmp_path):
    expected = sorted(k for p in sorted(shards.glob("*.tar")) for k, _ in read_all(str(p)))

    def keys(spec: str) -> list[str]:
        loader = build_loader(cfg_for(shards, shards=spec, drop_last=False, batch_size=8), seed=0)
        return sorted(k for b in take(loader, len(loader)) for k in b["keys"])

    assert keys(str(shards)) == expected
    assert keys(str(shards / "shard-*.tar")) == expected
    assert keys(str(shards / "shard-{000000..000004}.tar")) == expected
    assert (
        keys("file://" + str(shards) + "/shard-{000000..000002}.tar::" + str(shards / "shard-00000[34].tar"))
        == expected
    )
    pipes = "::".join(f"pipe:cat {p}" for p in sorted(shards.glob("*.tar")))  # no index beside: counted by reading
    assert keys(pipes) == expected
    copy = tmp_path / "bare"
    copy.mkdir()
    for p in shards.glob("*.tar"):
        shutil.copy(p, copy)  # no _shards.json, no manifests
    assert keys(str(copy)) == expected


def test_holdout_shards_are_never_trained_on(shards):
    cfg = cfg_for(shards, holdout_shards=1, drop_last=False)
    train = build_loader(cfg, seed=0)
    hold = build_loader(cfg, seed=0, split="holdout")
    train_keys = {k for b in take(train, len(train)) for k in b["keys"]}
    hold_keys = [k for b in hold for k in b["keys"]]  # one pass, in order
    assert len(hold_keys) == 8 and not train_keys & set(hold_keys) and len(train_keys) == 80
    assert hold_keys == [k for k, _ in read_all(str(shards / "shard-000004.tar"))]


def test_one_pass_reads_every_sample_once_with_a_short_last_batch(shards):
    for workers in (0, 2):
        loader = build_loader(
            cfg_for(shards, batch_size=5, drop_last=False, num_workers=workers), seed=0, one_pass=True
        )
        batches = list(loader)  # ends by itself
        keys = [k for b in batches for k in b["keys"]]
        assert len(keys) == len(set(keys)) == 88 and sorted(len(b["keys"]) for b in batches)[0] < 5
    dropped = list(build_loader(cfg_for(shards, batch_size=5), seed=0, one_pass=True))  # drop_last
    assert [len(b["keys"]) for b in dropped] == [5] * 17


def test_a_loader_state_of_the_old_format_starts_a_fresh_epoch(shards, caplog):
    """Checkpoints written before refill (state version 1: epoch, batch_in_epoch, ranks in lockstep)."""
    loader = build_loader(cfg_for(shards), seed=0)
    old = {"version": 1, "epoch": 3, "batch_in_epoch": 5, "layout": {}, "stats": {"batches": 71, "samples": 284}}
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        loader.load_state_dict(old)
    assert "state version 1 -> 2" in caplog.text and loader.epochs == 4.0 and loader.stats["batches"] == 71


def test_shards_are_plain_webdataset(shards):
    import webdataset as wds

    ds = wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False)
    first = next(iter(ds))
    assert {"__key__", "json", "mp4", "txt"} <= set(first) and "." not in first["__key__"]
    assert json.loads(first["json"])["key"] == first["__key__"]
    with pytest.raises(ValueError):
        build_loader(replace(cfg_for(shards), batch_size=100), world_size=1)


def test_pixels_are_the_same_with_and_without_workers(shards):
    def by_key(workers: int, dtype: str) -> dict[str, torch.Tensor]:
        loader = build_loader(
            cfg_for(shards, num_workers=workers, clip_start="start", drop_last=False, pixel_dtype=dtype), seed=0
        )
        return {k: px for b in take(loader, len(loader)) for k, px in zip(b["keys"], b["pixels"])}

    f0, f2, u2 = by_key(0, "float32"), by_key(2, "float32"), by_key(2, "uint8")
    assert f0.keys() == f2.keys() == u2.keys() and len(f0) == 88
    for k in f0:
        assert f0[k].dtype == torch.float32 and u2[k].dtype == torch.uint8
        assert torch.equal(f0[k], f2[k]) and torch.allclose(f0[k], u2[k].float() / 127.5 - 1, atol=1e-6)


def test_shards_sized_by_bytes_land_near_the_target(tmp_path):
    """--shard-bytes: bytes per clip are measured on probed inputs, shards come out near the target and
    every clip is written once; a bad size names the option."""
    from vldm.config.core import ConfigError
    from vldm.config.data import parse_bytes

    assert (parse_bytes("500MB"), parse_bytes("1GiB"), parse_bytes("2e4"), parse_bytes("")) == (
        500 * 10**6,
        2**30,
        20000,
        0,
    )
    with pytest.raises(ConfigError, match="shard_bytes"):
        ShardConfig(input="x", output="y", shard_bytes="12 parsecs").validate()
    write_corpus(SyntheticConfig(output=str(tmp_path / "videos"), count=40, size="64", frames=24, fps=8, seed=3))
    target = 120_000
    cfg = shard_corpus(
        tmp_path / "videos",
        tmp_path / "shards",
        videos_per_shard=0,
        frames=8,
        fps=8,
        size="64",
        crf=18,
        shard_bytes=str(target),
    )
    stats = json.loads((tmp_path / "shards" / "_stats.json").read_text())
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    sizes = [p.stat().st_size for p in tars]
    assert len(tars) >= 3, sizes
    assert stats["bytes_per_clip_estimate"] > 0 and stats["shard_size"]["bytes_max"] == max(sizes)
    for b in sizes[:-1]:  # every shard but the remainder near the target (same kind of content throughout)
        assert 0.6 * target < b < 1.4 * target, sizes
    keys = [k for p in tars for k, _ in read_all(str(p))]
    assert len(keys) == len(set(keys)) == 40 * 3 == stats["clips"]
    assert stats["settings"]["shard_bytes"] == cfg.shard_bytes


def test_resized_pixels_are_the_same_in_float_and_uint8(shards):
    """Stored 32 px, read at 16 px: the resize path decodes into the batch slot in both dtypes alike."""

    def first(dtype: str) -> dict:
        return next(
            iter(
                build_loader(cfg_for(shards, size=16, clip_start="start", shuffle_buffer=0, pixel_dtype=dtype), seed=0)
            )
        )

    f, u = first("float32"), first("uint8")
    assert f["keys"] == u["keys"] and f["pixels"].shape == (4, 3, 4, 16, 16)
    assert torch.equal(f["pixels"], u["pixels"].float() * np.float32(1 / 127.5) - 1)


def test_batch_buffers_are_reused_only_once_nothing_holds_them(shards):
    """The loader recycles batch memory (a fresh 100 MB batch costs page faults and zeroing), but never
    under a batch, or a view of one, that the consumer still holds."""
    loader = build_loader(cfg_for(shards, clip_start="start", shuffle_buffer=0, drop_last=False), seed=0)
    it = iter(loader)
    kept = next(it)
    kept_copy = kept["pixels"].clone()
    view = next(it)["pixels"][1:3, :, ::2]  # only a strided view of the second batch survives
    view_copy = view.clone()
    ptrs = []
    for _ in range(len(loader) - 2):
        b = next(it)
        ptrs.append(b["pixels"].data_ptr())
        del b  # the usual training loop: the batch is dropped before the next one is asked for
    assert torch.equal(kept["pixels"], kept_copy) and torch.equal(view, view_copy)
    assert loader._pool.reused > 0 and len(set(ptrs)) < len(ptrs)  # dropped batches' memory came back
    assert kept["pixels"].data_ptr() not in ptrs and view.untyped_storage().data_ptr() not in ptrs


def test_skipping_the_probe_decode_gives_the_same_frames(shards):
    """The loader opens its own clips without FFmpeg's probe decoding: same frames, bit for bit."""
    from vldm.data.codec import decode_window

    tar = sorted(shards.glob("*.tar"))[0]
    for _, members in read_all(str(tar))[:3]:
        a = decode_window(members["mp4"], 1, 3, 2, channels_first=True, format="mp4")
        b = decode_window(members["mp4"], 1, 3, 2, channels_first=True, format="mp4", probe_decode=False)
        assert a.shape == (3, 3, 32, 32) and np.array_equal(a, b)

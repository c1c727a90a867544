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
from vldm.data.order import batches_per_epoch, worker_plan
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


def test_order_is_a_partition_with_equal_batch_counts():
    counts = [20, 20, 20, 20, 8, 13]
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            for drop_last in (False, True):
                seen = []
                for rank in range(world):
                    plans = [
                        worker_plan(
                            counts,
                            seed=0,
                            epoch=1,
                            rank=rank,
                            world_size=world,
                            num_workers=workers,
                            worker=w,
                            batch_size=4,
                            drop_last=drop_last,
                            shuffle_buffer=5,
                        )
                        for w in range(workers)
                    ]
                    ids = sorted(j for p in plans for j in p.batch_ids)
                    assert ids == list(range(batches_per_epoch(sum(counts), world, 4, drop_last)))
                    for p in plans:
                        assert sorted(p.order) == list(range(sum(p.batch_sizes)))
                        seen += [(s.shard, i) for s in p.segments for i in range(s.begin, s.end)]
                assert len(seen) == len(set(seen))  # no sample twice in an epoch
                if not drop_last:
                    assert len(seen) == sum(counts) // world * world


def test_ranks_and_workers_cover_every_sample_once_per_epoch(shards):
    all_keys = {k for p in sorted(shards.glob("*.tar")) for k, _ in read_all(str(p))}
    assert len(all_keys) == 88
    for world, workers in ((2, 2), (4, 0)):
        cfg = cfg_for(shards, num_workers=workers, drop_last=False, batch_size=5)
        loaders = [build_loader(cfg, rank=r, world_size=world, seed=3) for r in range(world)]
        assert len({len(ld) for ld in loaders}) == 1  # every rank the same number of batches (DDP)
        per_rank = [[k for b in take(ld, len(ld)) for k in b["keys"]] for ld in loaders]
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)) == 88 and set(flat) == all_keys
        # the next epoch is a different order of the same samples
        epoch2 = [k for b in take(loaders[0], len(loaders[0])) for k in b["keys"]]
        assert epoch2 != per_rank[0] and loaders[0].epoch == 1


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
    assert (one.epoch, one.batch_in_epoch) == (1, 0)


def test_corrupt_samples_are_skipped_counted_and_never_replaced(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    samples = read_all(str(shards / "shard-000000.tar"))
    broken = {samples[3][0]: "mp4", samples[7][0]: "json"}
    with open(bad / "shard-000000.tar", "wb") as f:
        w = SampleWriter(f)
        for key, m in samples:
            m = dict(m)
            if broken.get(key) == "mp4":
                m["mp4"] = b"\x00\x00\x00\x18ftypisom" + bytes(500)
            if broken.get(key) == "json":
                m["json"] = b"{not json"
            w.write(key, m)
        w.close()
    cfg = cfg_for(bad, shuffle_buffer=0, drop_last=False)
    loader = build_loader(cfg, seed=0)
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        batches = take(loader, len(loader))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 5 and len(keys) == 18 and set(keys) == {k for k, _ in samples} - set(broken)
    assert sorted(len(b["keys"]) for b in batches) == [3, 3, 4, 4, 4]  # dropped, not replaced
    assert loader.stats["corrupt"] == 2 and loader.stats["corrupt_by_reason"] == {"decode_error": 1, "bad_json": 1}
    assert all(k in caplog.text for k in broken)
    # a shard cut short after it was indexed: the rest of it is counted, training goes on
    (bad / "shard-000000.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[:30000])
    shutil.copy(shards / "_shards.json", bad)
    loader = build_loader(cfg, seed=0)
    keys = [k for b in take(loader, len(loader)) for k in b["keys"]]
    assert 0 < len(keys) < 20 and loader.stats["corrupt"] == 20 - len(keys)


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

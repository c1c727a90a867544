"""The moving-shapes corpus and the input listing (directories, manifests, sidecars, failed.jsonl)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vldm.config.data import SyntheticConfig
from vldm.data.codec import decode_all
from vldm.data.sources import list_inputs
from vldm.data.synthetic import ALL_COLOURS, DIRECTIONS, NEW_COLOURS, PALETTE, make_video, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_is_deterministic_and_captions_match_the_motion(tmp_path):
    cfg = SyntheticConfig(output=str(tmp_path / "a"), count=12, size="64", frames=16, fps=8, seed=3)
    paths = write_corpus(cfg)
    again = write_corpus(SyntheticConfig(**{**cfg.__dict__, "output": str(tmp_path / "b")}))
    other = write_corpus(SyntheticConfig(**{**cfg.__dict__, "output": str(tmp_path / "c"), "seed": 4}))
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert [p.with_suffix(".json").read_bytes() for p in paths] == [p.with_suffix(".json").read_bytes() for p in again]
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in other]
    for p in paths:
        side = json.loads(p.with_suffix(".json").read_text())
        frames = decode_all(str(p))
        assert frames.shape == (16, 64, 64, 3)
        assert side["caption"] == " and ".join(
            f"{'an' if s['color'][0] in 'aeiou' else 'a'} {s['color']} {s['shape']} moving {s['direction']}"
            for s in side["shapes"]
        )
        for s in side["shapes"]:
            vx, vy = s["velocity"]
            # the caption's direction word is the 45-degree sector of the initial velocity (y grows down)
            sector = round(math.degrees(math.atan2(-vy, vx)) / 45) % 8
            assert s["direction"] == DIRECTIONS[sector]
            traj = np.array(s["trajectory"])
            r = s["radius"]
            assert traj.shape == (16, 2)
            assert (
                (traj >= r - 1e-6).all() and (traj[:, 0] <= 64 - r + 1e-6).all() and (traj[:, 1] <= 64 - r + 1e-6).all()
            )
            speed = np.linalg.norm(np.diff(traj, axis=0), axis=1)
            no_bounce = [i for i in range(15) if i + 1 not in s["bounces"]]
            assert np.allclose(speed[no_bounce], math.hypot(vx, vy), atol=1e-3)  # constant velocity
        if len(side["shapes"]) == 1:
            # the rendered shape sits where the trajectory says (centroid of its colour, frame 0)
            s = side["shapes"][0]
            frame, _ = make_video(cfg, side["index"])
            mask = np.abs(frame[0].astype(int) - PALETTE[s["color"]]).sum(axis=2) < 60
            ys, xs = np.nonzero(mask)
            cy = ys.mean() + 0.5
            if s["shape"] == "triangle":
                cy -= s["radius"] / 3  # a triangle's centroid lies a third below its box centre
            assert abs(xs.mean() + 0.5 - s["trajectory"][0][0]) < 1.0 and abs(cy - s["trajectory"][0][1]) < 1.0


def test_cli_help_documents_every_option_with_its_default():
    for script in ("make_synthetic.py", "shard_videos.py"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "data_prep" / script), "--help"], capture_output=True, text=True, check=True
        ).stdout
        # option lines are indented by 2; wrapped help text (which may mention --other-options) by more
        options = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
        assert len(options) > 8
        text = " ".join(out.split())
        assert text.count("(default:") >= len(options), script
    bad = subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / "shard_videos.py"), "in", "out", "--size", "63"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "even" in bad.stderr


def test_one_run_per_output_directory(tmp_path):
    from vldm.data.fsutil import DirLock

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with DirLock(out):  # as a running sharder holds it
        busy = subprocess.run(
            [sys.executable, str(ROOT / "data_prep" / "shard_videos.py"), str(tmp_path / "in"), str(out)],
            capture_output=True,
            text=True,
        )
    assert busy.returncode == 2 and "another sharding run holds" in busy.stdout


def test_inputs_from_directories_manifests_sidecars_and_failed_jsonl(tmp_path):
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for name in ("b.mp4", "a.MOV", "sub/c.mkv", ".hidden/x.mp4", ".dot.mp4", "notes.txt"):
        (d / name).write_bytes(b"x")
    (d / "a.txt").write_text("caption from txt\n")
    (d / "b.json").write_text(json.dumps({"caption": "caption from json", "scene": 7}))
    records, dups = list_inputs(str(d), ("mp4", "mov", "mkv"))
    assert [Path(r.path).relative_to(d).as_posix() for r in records] == ["a.MOV", "b.mp4", "sub/c.mkv"]
    assert all(Path(r.path).is_absolute() for r in records)
    assert [r.caption for r in records] == ["caption from txt", "caption from json", None]
    assert records[1].meta == {"scene": 7} and dups == 0

    (tmp_path / "m.csv").write_text(
        "path,caption,split\nvideos/b.mp4,from csv,train\nvideos/b.mp4,dup,train\nvideos/a.MOV,,val\n"
    )
    records, dups = list_inputs(str(tmp_path / "m.csv"), ("mp4",))
    assert dups == 1 and [r.caption for r in records] == ["from csv", "caption from txt"]  # empty cell -> sidecar
    assert records[0].path == str(d / "b.mp4") and records[0].meta == {"split": "train"}

    pq.write_table(
        pa.table({"path": [str(d / "sub/c.mkv")], "caption": ["from parquet"], "fps_hint": [30]}),
        tmp_path / "m.parquet",
    )
    records, _ = list_inputs(str(tmp_path / "m.parquet"), ("mp4",))
    assert records[0].caption == "from parquet" and records[0].meta == {"fps_hint": 30}

    # failed.jsonl rows are inputs again: the failure columns are dropped, caption and meta kept
    row = {
        "path": str(d / "b.mp4"),
        "reason": "unreadable",
        "error": "x",
        "caption": "c",
        "meta": {"scene": 7},
        "shard": "s-0",
    }
    (tmp_path / "failed.jsonl").write_text(json.dumps(row) + "\n")
    records, _ = list_inputs(str(tmp_path / "failed.jsonl"), ("mp4",))
    assert [(r.path, r.caption, r.meta) for r in records] == [(str(d / "b.mp4"), "c", {"scene": 7})]

    records, _ = list_inputs("file://" + str(d / "b.mp4"), ("mp4",))
    assert records[0].caption == "caption from json"


def test_texture_is_deterministic_keeps_the_shapes_and_costs_bits():
    """texture > 0 (benchmarks): a panning, grainy background, reproducible by seed, shapes drawn solid
    on top, several times the bitrate of flat frames; texture 0 draws nothing from its random stream."""
    from vldm.data.synthetic import make_video
    from vldm.io import encode_frames

    flat_cfg = SyntheticConfig(output="unused", size="64", frames=16, fps=8, seed=5)
    tex_cfg = SyntheticConfig(output="unused", size="64", frames=16, fps=8, seed=5, texture=30)
    flat, side_flat = make_video(flat_cfg, 3)
    a, side = make_video(tex_cfg, 3)
    b, _ = make_video(tex_cfg, 3)
    assert np.array_equal(a, b) and side == side_flat  # same shapes, same motion, same caption
    colours = [np.asarray(PALETTE[s["color"]]) for s in side["shapes"]]
    shape_px = np.any([(flat == c).all(-1) for c in colours], axis=0)  # pixels fully inside a shape (edges blend)
    assert shape_px.sum() > 16 * 50
    assert np.array_equal(a[shape_px], flat[shape_px])
    assert (
        a[~shape_px].std() > 10 and np.abs(np.diff(a[:, ~shape_px[0]].astype(int), axis=0)).mean() > 3
    )  # moving detail
    assert len(encode_frames(a, 8, crf=20)) > 3 * len(encode_frames(flat, 8, crf=20))  # 3.4x at 64 px (10x at 256)


def test_fsspec_inputs_directory_manifest_and_sidecars_give_clips(tmp_path):
    """A non-local fsspec filesystem (memory://, standing in for s3:// or gs://): directory listing,
    sidecar captions, a manifest with relative paths, and the videos read through fsspec into clips."""
    import fsspec

    from vldm.config.data import ShardConfig
    from vldm.data.clips import ClipSpec
    from vldm.data.shards import write_shard
    from vldm.data.tario import read_all

    fs = fsspec.filesystem("memory")
    write_corpus(SyntheticConfig(output=str(tmp_path / "local"), count=2, size="32", frames=16, fps=8, seed=2))
    for p in sorted((tmp_path / "local").glob("*.mp4")):
        fs.pipe(f"/corpus/{p.name}", p.read_bytes())
    fs.pipe("/corpus/syn_00000.txt", b"a caption from a sidecar\n")
    fs.pipe("/corpus/list.csv", b"path,caption,take\nsyn_00001.mp4,from the manifest,3\n")
    try:
        records, _ = list_inputs("memory://corpus/", ("mp4",))
        assert [r.path.replace(":///", "://") for r in records] == [
            "memory://corpus/syn_00000.mp4",
            "memory://corpus/syn_00001.mp4",
        ]
        assert records[0].caption == "a caption from a sidecar"
        listed, _ = list_inputs("memory://corpus/list.csv", ("mp4",))
        assert [(r.path.replace(":///", "://"), r.caption, r.meta) for r in listed] == [
            ("memory://corpus/syn_00001.mp4", "from the manifest", {"take": "3"})
        ]  # csv cells are text
        out = tmp_path / "out"
        out.mkdir()
        summary = write_shard(
            out,
            "s",
            list(enumerate(records)),
            ClipSpec.from_config(ShardConfig(input="x", output="y", frames=8, fps=8, size="32")),
        )
        assert summary["failed"] == [] and summary["samples"] == 4
        metas = [json.loads(m["json"]) for _, m in read_all(str(out / "s.tar"))]
        assert {m["source"] for m in metas} == {r.path for r in records} and all(m["source_size"] > 0 for m in metas)
    finally:
        fs.rm("/corpus", recursive=True)


def test_colors_option_keeps_the_default_corpus_and_draws_a_new_colour_only_by_name():
    """--colors: the default corpus is the same videos as before the option (naming the 8 PALETTE colours in
    their order draws the same); a NEW_COLOURS colour appears only when named, rendered in its own RGB."""
    from vldm.config.core import ConfigError

    base = dict(output="", count=6, size="32", frames=4, seed=5)
    default = [make_video(SyntheticConfig(**base), i) for i in range(6)]
    named = [make_video(SyntheticConfig(**base, colors=",".join(PALETTE)), i) for i in range(6)]
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(default, named))
    assert not any(s["color"] in NEW_COLOURS for _, side in default for s in side["shapes"])
    cfg = SyntheticConfig(**base, colors="pink", max_shapes=1)
    cfg.validate()
    for i in range(3):
        frames, side = make_video(cfg, i)
        assert side["shapes"][0]["color"] == "pink" and side["caption"].startswith("a pink ")
        inside = np.abs(frames[0].astype(int) - ALL_COLOURS["pink"]).max(axis=-1) < 8
        assert inside.sum() > 20  # solid pink pixels where the shape is
    with pytest.raises(ConfigError, match="colors: unknown"):
        make_video(SyntheticConfig(**base, colors="pink,mauve"), 0)

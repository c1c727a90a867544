"""`make paper` (issue 13): each model of the cascade measured against the synthetic domain's ground truth.

    python -m vldm.paper [--fast] [--out outputs/paper] [--demo-dir DIR] [--rows keyframes,decoder]

Stages (every command's full output is in OUT/logs/):
  1. demo       `python -m vldm.demo --out OUT/demo` (the real pipeline: corpus, shards by `ray job
                submit`, image LDM + temporal layers through slurm/train_temporal.sbatch, W&B offline,
                eval pool); --demo-dir reuses a finished demo instead
  2. truth      held-out ground truth: data_prep/make_synthetic.py with another seed (videos the demo
                never saw), decoded with PyAV, with their sidecars (background, colour, trajectory)
  3. rows       each row trains what it needs (through the same launcher), samples on the held-out
                prompts / clips, measures with vldm.paper.metrics, saves its mp4s and one PNG
  4. summary    OUT/summary.json (one entry per row), the printed table

The demo is run as a command, not imported: library code never imports vldm.demo (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDANCE = 3.0  # the demo's text guidance scale, so that the key-frame row measures the demo's own samples


@dataclass(frozen=True)
class Plan:
    name: str
    heldout_videos: int  # ground-truth videos (seed HELDOUT_SEED), one prompt / clip each
    clip_frames: int  # frames measured per video (the demo's clip length)
    sample_steps: int
    decoder_steps: int


FULL = Plan("full", heldout_videos=16, clip_frames=8, sample_steps=25, decoder_steps=300)
FAST = Plan("fast", heldout_videos=2, clip_frames=8, sample_steps=4, decoder_steps=4)
HELDOUT_SEED = 1  # the demo's corpus is seed 0: seed 1 gives other shapes, colours and trajectories
BUILT = ("keyframes", "decoder")


class Paper:
    def __init__(self, plan: Plan, out: Path, demo_dir: Path | None = None, rows: tuple[str, ...] = BUILT):
        self.plan, self.out = plan, out.resolve()
        self.demo = (demo_dir or self.out / "demo").resolve()
        self.reuse_demo = demo_dir is not None
        self.rows_wanted = rows
        self.py = sys.executable
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ)
        self.env["PATH"] = str(Path(self.py).parent) + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHON"] = self.py  # slurm/train_temporal.sbatch runs $PYTHON
        self.env.setdefault("WANDB_MODE", "offline")
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
            self.env.setdefault(var, str(self.out / "wandb" / sub))
        self.env.setdefault("WANDB_SILENT", "true")
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def say(self, msg: str) -> None:
        print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run(self, cmd: list[str], log: str, timeout: float | None = None) -> None:
        """A command with its output appended to OUT/logs/LOG; a failure names the log and its tail."""
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / log
        with open(path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT), timeout=timeout)
        if proc.returncode != 0:
            tail = "".join(path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {path}:\n{tail}")

    # ------------------------------------------------------------------ 1. demo
    def run_demo(self) -> None:
        if self.reuse_demo:
            if not (self.demo / "summary.json").exists():
                raise FileNotFoundError(f"--demo-dir {self.demo} has no summary.json (not a finished demo)")
            self.say(f"  reusing the demo in {self.demo}")
            return
        cmd = [self.py, "-m", "vldm.demo", "--out", str(self.demo)] + (["--fast"] if self.plan.name == "fast" else [])
        self.say(f"  {' '.join(cmd[1:])} (log {self.logs / '1_demo.log'})")
        self.run(cmd, "1_demo.log")

    # ------------------------------------------------------------------ 2. ground truth
    def make_truth(self) -> None:
        from vldm.data.codec import decode_all

        d = self.out / "heldout"
        shutil.rmtree(d, ignore_errors=True)
        # the demo corpus' options (one shape, 1.3-2.6 px per frame at 32 px) with another seed
        self.run(
            [
                self.py,
                "data_prep/make_synthetic.py",
                str(d),
                "--count",
                str(self.plan.heldout_videos),
                "--size",
                "32",
                "--frames",
                str(self.plan.clip_frames),
                "--fps",
                "8",
                "--max-shapes",
                "1",
                "--min-speed",
                "0.04",
                "--max-speed",
                "0.08",
                "--seed",
                str(HELDOUT_SEED),
            ],
            "2_truth.log",
        )
        self.truth = []
        for mp4 in sorted(d.glob("*.mp4")):
            side = json.loads(mp4.with_suffix(".json").read_text())
            self.truth.append((decode_all(str(mp4)), side))
        self.say(f"  {len(self.truth)} held-out ground-truth clips (seed {HELDOUT_SEED}) in {d}")

    # ------------------------------------------------------------------ 3. rows
    def row_keyframes(self):
        import numpy as np
        import torch

        from vldm.paper import metrics as M
        from vldm.paper.rows import bars_png, keyframes_row
        from vldm.sample.api import Cascade, generate

        prompts = [s["caption"] for _, s in self.truth]
        bgs = [s["background_rgb"] for _, s in self.truth]
        cascade = Cascade.from_runs(str(self.demo / "runs" / "video"), ema=True, device="cpu")
        measured, samples = {}, []
        for mode, image_mode in (("image_mode", True), ("video_model", False)):
            out = generate(
                cascade,
                prompts,
                seeds=list(range(len(prompts))),
                progress=False,
                num_frames=self.plan.clip_frames,
                steps=self.plan.sample_steps,
                guidance_scale=GUIDANCE,
                image_mode=image_mode,
            )
            d = self.out / "samples" / "keyframes" / mode
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            samples += [str(p) for p in out.save(d / "sample.mp4")]
            with torch.no_grad():
                u8 = ((out.videos.permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            measured[mode] = {"identity": M.identity_summary(list(u8), bgs), "motion": M.motion_summary(list(u8), bgs)}
        real = [v for v, _ in self.truth]
        measured["real"] = {"identity": M.identity_summary(real, bgs), "motion": M.motion_summary(real, bgs)}
        row = keyframes_row(measured["image_mode"], measured["video_model"], measured["real"])
        row.samples = samples
        srcs = {"image mode": "image_mode", "video model": "video_model", "real clips": "real"}
        row.picture = str(
            bars_png(
                self.out / "keyframes.png",
                "key frames: identity drift within a video (lower = shape kept)",
                {
                    "colour drift (RGB / 255)": {k: measured[v]["identity"]["colour_drift"] for k, v in srcs.items()},
                    "area drift (relative)": {k: measured[v]["identity"]["area_drift"] for k, v in srcs.items()},
                    "acceleration (frame units)": {k: measured[v]["motion"]["accel"] for k, v in srcs.items()},
                },
            )
        )
        return row

    def row_decoder(self):
        import numpy as np
        import torch

        from vldm.io import write_mp4
        from vldm.models.temporal_decoder import VideoDecoder
        from vldm.paper import metrics as M
        from vldm.paper.rows import bars_png, decoder_row
        from vldm.sample.runs import load_decoder

        steps = self.plan.decoder_steps
        run = self.out / "runs" / "decoder"
        shutil.rmtree(run, ignore_errors=True)
        # the decoder stage through the same launcher as every stage (2 local ranks, DDP over gloo)
        self.run(
            [
                "bash",
                "slurm/train_temporal.sbatch",
                "configs/decoder_tiny.yaml",
                f"run_dir={run}",
                f"model.pretrained={self.demo / 'models' / 'base'}",
                f"data.shards={self.demo / 'shards'}",
                f"data.num_frames={self.plan.clip_frames}",
                f"train.max_steps={steps}",
                f"checkpoint.every={steps}",
                f"train.log_every={max(1, steps // 10)}",
                "wandb.mode=offline",
            ],
            "3_decoder.log",
        )
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(self.demo / "models" / "base" / "vae")).eval()
        image_dec = VideoDecoder.from_vae(vae).eval()  # the image decoder, exactly (temporal layers at identity)
        video_dec = load_decoder(run)
        clips = np.stack([v for v, _ in self.truth])  # (b, f, h, w, 3) uint8
        x = torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)  # b c f h w
        with torch.no_grad():
            frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
            z = vae.encode(frames).latent_dist.mean * vae.config.scaling_factor
            z = z.unflatten(0, (x.shape[0], x.shape[2])).permute(0, 2, 1, 3, 4)
            decoded = {"image_decoder": image_dec.decode(z, image_only=True), "video_decoder": video_dec.decode(z)}
        measured, samples = {}, []
        for name, vid in decoded.items():
            u8 = ((vid.permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            measured[name] = {
                "psnr": float(np.mean([M.psnr(a, b) for a, b in zip(u8, clips)])),
                "tde": float(np.mean([M.temporal_difference_error(a, b) for a, b in zip(u8, clips)])),
                "flicker": float(np.mean([M.flicker(a) for a in u8])),
            }
            d = self.out / "samples" / "decoder" / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            samples += [str(write_mp4(d / f"clip_{i:03d}.mp4", v, 8.0)) for i, v in enumerate(vid)]
        row = decoder_row(measured["image_decoder"], measured["video_decoder"])
        row.metrics["train_steps"] = steps
        row.samples = samples
        real_flicker = float(np.mean([M.flicker(c) for c in clips]))
        row.baselines["real_clips"] = {"flicker": real_flicker}
        row.picture = str(
            bars_png(
                self.out / "decoder.png",
                f"decoder: same latents of held-out clips, image vs video decoder ({steps} steps)",
                {
                    "temporal-difference error vs truth (0-255)": {k: measured[k]["tde"] for k in measured},
                    "PSNR vs truth (dB)": {k: measured[k]["psnr"] for k in measured},
                    "flicker (0-255)": {**{k: measured[k]["flicker"] for k in measured}, "real clips": real_flicker},
                },
            )
        )
        return row

    def rows(self) -> list:
        from vldm.paper.rows import ROWS, not_built

        out = []
        for name in ROWS:
            fn = getattr(self, f"row_{name}", None)
            if fn is None:
                out.append(not_built(name, "not built yet: no measurement of this row exists in vldm/paper"))
                continue
            if name not in self.rows_wanted:
                out.append(not_built(name, "not run (--rows)"))
                continue
            self.say(f"  row {name}")
            t0 = time.perf_counter()
            row = fn()
            row.seconds = round(time.perf_counter() - t0, 1)
            self.say(f"  row {name}: shown={row.shown} in {row.seconds:.0f} s {row.note}")
            out.append(row)
        return out

    # ------------------------------------------------------------------ all
    def main(self) -> dict:
        from vldm.paper.rows import table, write_summary

        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"{self.plan.name} variant -> {self.out} (logs in {self.logs})")
        for name, fn in (("demo", self.run_demo), ("truth", self.make_truth)):
            t0 = time.perf_counter()
            self.say(f"stage {name}")
            fn()
            self.timings[name] = round(time.perf_counter() - t0, 1)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        rows = self.rows()
        wall = round(time.perf_counter() - t_start, 1)
        extra = {
            "variant": self.plan.name,
            "plan": self.plan.__dict__,
            "demo": str(self.demo),
            "heldout_seed": HELDOUT_SEED,
            "timings_s": {**self.timings, **{r.name: r.seconds for r in rows if r.seconds}, "total": wall},
        }
        path = write_summary(self.out / "summary.json", rows, extra)
        print()
        print(table(rows))
        print(f"\nsummary  {path}\nsamples  {self.out / 'samples'}\nwall {wall:.0f} s")
        return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fast", action="store_true", default=os.environ.get("PAPER_FAST") == "1")
    ap.add_argument("--out", default=os.environ.get("PAPER_OUT", "outputs/paper"))
    ap.add_argument("--demo-dir", default=None, help="reuse a finished `make demo` output instead of running it")
    ap.add_argument("--rows", default=",".join(BUILT), help=f"rows to run (default: {','.join(BUILT)})")
    a = ap.parse_args(argv)
    rows = tuple(r for r in a.rows.split(",") if r)
    unknown = [r for r in rows if r not in BUILT]
    if unknown:
        ap.error(f"--rows: {unknown} not built (built: {', '.join(BUILT)})")
    try:
        Paper(FAST if a.fast else FULL, Path(a.out), Path(a.demo_dir) if a.demo_dir else None, rows).main()
    except (RuntimeError, FileNotFoundError) as e:
        print(f"[paper] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    return 0

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
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vldm.paper.rows import ROWS

ROOT = Path(__file__).resolve().parents[2]
GUIDANCE = 3.0  # the demo's text guidance scale, so that the key-frame row measures the demo's own samples


@dataclass(frozen=True)
class Plan:
    name: str
    heldout_videos: int  # ground-truth videos (seed HELDOUT_SEED), one prompt / clip each
    clip_frames: int  # frames measured per video (the demo's clip length)
    sample_steps: int
    decoder_steps: int
    temporal_steps: int  # steps of each extra temporal model (prediction, interpolation): the demo's 800
    rollout_frames: int = 32  # the rollout row's length: 4x the training clips
    upsampler_steps: int = 300  # each of the upsampler's two stages (image upscaler, then its temporal layers)
    upsampler_videos: int = 48  # its 128 px training corpus (16 frames each: 2 clips)
    upsampler_heldout: int = 4  # held-out 128 px clips it is measured on
    upsample_sample_steps: int = 10  # DDIM steps of the upsampler (a 128 px frame costs 16 key frames' pixels)
    personalise_steps: int = 150  # fine-tune of image model A into B on the new concept
    concept_videos: int = 24  # B's training corpus: a few dozen clips of the new colour
    cascade_prompts: int = 4  # videos through the whole cascade (29 frames at 128 px each)
    # ranks of each training (slurm/train_temporal.sbatch's NPROC without SLURM); the fast variant's few steps
    # take 1: a rank costs its start-up (imports, DeepSpeed) on the same 2 cores and shows nothing more there
    ranks: int = 2


FULL = Plan("full", heldout_videos=16, clip_frames=8, sample_steps=25, decoder_steps=300, temporal_steps=800)
FAST = Plan("fast", heldout_videos=2, clip_frames=8, sample_steps=4, decoder_steps=4, temporal_steps=4)
# the upsampler, personalisation and cascade rows (vldm/paper/{upsampler,personalisation,cascade}.py)
FAST = dataclasses.replace(
    FAST,
    upsampler_steps=4,
    upsampler_videos=4,
    upsampler_heldout=2,
    upsample_sample_steps=2,
    personalise_steps=4,
    concept_videos=4,
    cascade_prompts=1,
    ranks=1,
)
HELDOUT_SEED = 1  # the demo's corpus is seed 0: seed 1 gives other shapes, colours and trajectories
BUILT = ROWS  # every row of issue 13 is built
# rows that train and measure on corpora of their own: `--rows upsampler` alone neither runs nor needs a demo
NO_DEMO_ROWS = frozenset({"upsampler"})
CONTEXT_GUIDANCE = (1.0, 1.5, 3.0)  # context guidance scales of the prediction row (1 = off; 1.5 = the default)


def _cpu() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Paper:
    def __init__(
        self,
        plan: Plan,
        out: Path,
        demo_dir: Path | None = None,
        rows: tuple[str, ...] = BUILT,
        reuse_runs: bool = False,
    ):
        self.plan, self.out, self.reuse_runs = plan, out.resolve(), reuse_runs
        self.demo = (demo_dir or self.out / "demo").resolve()
        self.reuse_demo = demo_dir is not None
        self.rows_wanted = rows
        self.py = sys.executable
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ)
        self.env["PATH"] = str(Path(self.py).parent) + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHON"] = self.py  # slurm/train_temporal.sbatch runs $PYTHON
        self.env.setdefault("NPROC", str(plan.ranks))  # the ranks of a local (non-SLURM) training
        self.env.setdefault("WANDB_MODE", "offline")
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
            self.env.setdefault(var, str(self.out / "wandb" / sub))
        self.env.setdefault("WANDB_SILENT", "true")
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    @property
    def image_ldm(self) -> Path:
        return self.demo / "models" / "image_ldm"

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
        if set(self.rows_wanted) <= NO_DEMO_ROWS:
            self.say(f"  no demo: {', '.join(self.rows_wanted)} train on corpora of their own")
            return
        if self.reuse_demo:
            need = [self.demo / "shards", self.image_ldm / "unet", self.demo / "models" / "base" / "vae"]
            if {"keyframes", "ablation", "personalisation", "cascade"} & set(self.rows_wanted):
                need.append(self.demo / "summary.json")  # these rows sample the demo's video model
            if "interpolation" in self.rows_wanted:
                need.append(self.demo / "runs" / "image")  # the interpolator's cascade starts on the image LDM run
            missing = [str(p.relative_to(self.demo)) for p in need if not p.exists()]
            if missing:
                raise FileNotFoundError(f"--demo-dir {self.demo} lacks {', '.join(missing)} (not a finished demo)")
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
                str(max(self.plan.clip_frames, self.plan.rollout_frames)),
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
    def generate_measured(self, run: Path, row: str, mode: str, image_mode: bool) -> tuple[dict, list[str]]:
        """The held-out captions through a key-frame run (seeds 0..n-1, as the demo samples), saved under
        samples/ROW/MODE/; identity and motion figures of the decoded videos."""
        import numpy as np
        import torch

        from vldm.paper import metrics as M
        from vldm.sample.api import Cascade, generate

        prompts = [s["caption"] for _, s in self.truth]
        bgs = [s["background_rgb"] for _, s in self.truth]
        cascade = Cascade.from_runs(str(run), ema=True, device="cpu")
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
        d = self.out / "samples" / row / mode
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        samples = [str(p) for p in out.save(d / "sample.mp4")]
        with torch.no_grad():
            u8 = ((out.videos.permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        return {"identity": M.identity_summary(list(u8), bgs), "motion": M.motion_summary(list(u8), bgs)}, samples

    def real_measured(self) -> dict:
        from vldm.paper import metrics as M

        bgs = [s["background_rgb"] for _, s in self.truth]
        real = [v[: self.plan.clip_frames] for v, _ in self.truth]
        return {"identity": M.identity_summary(real, bgs), "motion": M.motion_summary(real, bgs)}

    def row_keyframes(self):
        from vldm.paper.rows import bars_png, keyframes_row

        video_run = self.demo / "runs" / "video"
        measured, samples = {}, []
        for mode, image_mode in (("image_mode", True), ("video_model", False)):
            measured[mode], paths = self.generate_measured(video_run, "keyframes", mode, image_mode)
            samples += paths
        measured["real"] = self.real_measured()
        self._keyframes = measured  # the ablation row compares with the same figures
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

    def row_ablation(self):
        import json as _json

        from vldm.paper.rows import ablation_row, bars_png

        steps = _json.loads((self.demo / "summary.json").read_text())["plan"]["temporal_steps"]
        # the demo's temporal stage with attention-only temporal layers, at the demo's own step count
        run = self.out / "runs" / "ablation_attention_only"
        if not (self.reuse_runs and self.trained(run, steps)):
            shutil.rmtree(run, ignore_errors=True)
            self.run(
                [
                    "bash",
                    "slurm/train_temporal.sbatch",
                    "configs/demo_temporal.yaml",
                    f"run_dir={run}",
                    f"model.pretrained={self.image_ldm}",
                    f"data.shards={self.demo / 'shards'}",
                    "model.temporal.res_blocks=false",
                    f"train.max_steps={steps}",
                    f"checkpoint.every={steps}",
                    f"train.log_every={max(1, min(50, steps // 10))}",
                    f"optim.warmup_steps={max(1, min(50, steps // 8))}",
                    "wandb.name=paper-ablation-attention-only",
                ],
                "3_ablation.log",
            )
        att, samples = self.generate_measured(run, "ablation", "attention_only", False)
        if getattr(self, "_keyframes", None) is None:
            full, more = self.generate_measured(self.demo / "runs" / "video", "ablation", "full", False)
            samples += more
            real = self.real_measured()
        else:
            full, real = self._keyframes["video_model"], self._keyframes["real"]
        row = ablation_row(att, full, real)
        row.metrics["train_steps"] = steps
        row.samples = samples
        srcs = {"attention only": att, "full": full, "real clips": real}
        row.picture = str(
            bars_png(
                self.out / "ablation.png",
                f"ablation: attention-only vs full temporal layers, {steps} steps each",
                {
                    "colour drift": {k: v["identity"]["colour_drift"] for k, v in srcs.items()},
                    "area drift": {k: v["identity"]["area_drift"] for k, v in srcs.items()},
                    "acceleration": {k: v["motion"]["accel"] for k, v in srcs.items()},
                },
            )
        )
        return row

    # ------------------------------------------------------------------ shared by the rows
    def train_stage(self, config: str, name: str, steps: int, pretrained: Path) -> Path:
        """A temporal model on the demo's image LDM and shards, through slurm/train_temporal.sbatch (bash:
        plan.ranks local ranks, DeepSpeed ZeRO-2), W&B offline. Returns its run directory."""
        run = self.out / "runs" / name
        if self.reuse_runs and self.trained(run, steps):
            self.say(f"  reusing {run} ({steps} steps, --reuse-runs)")
            return run
        shutil.rmtree(run, ignore_errors=True)
        self.run(
            [
                "bash",
                "slurm/train_temporal.sbatch",
                config,
                f"run_dir={run}",
                f"model.pretrained={pretrained}",
                f"data.shards={self.demo / 'shards'}",
                f"train.max_steps={steps}",
                f"checkpoint.every={steps}",
                f"train.log_every={max(1, min(50, steps // 10))}",
                f"optim.warmup_steps={max(1, min(50, steps // 8))}",
                "wandb.mode=offline",
            ],
            f"3_{name}.log",
        )
        return run

    @staticmethod
    def trained(run: Path, steps: int) -> bool:
        """Whether `run` holds a complete checkpoint of exactly `steps` steps."""
        from vldm.checkpoint import complete_checkpoints, step_dir_name

        return any(ck.name == step_dir_name(steps) for ck in complete_checkpoints(run)) if run.is_dir() else False

    def truth_pixels(self, frames: int | None = None):
        """The held-out clips as (b, 3, f, H, W) pixels in [-1, 1] (first `frames` frames)."""
        import numpy as np
        import torch

        clips = np.stack([v[: frames or self.plan.clip_frames] for v, _ in self.truth])
        return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()

    @staticmethod
    def to_u8(videos) -> list:
        """(b, 3, f, H, W) in [-1, 1] -> list of (f, H, W, 3) uint8."""
        import numpy as np

        return list(((videos.permute(0, 2, 3, 4, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))

    def save_videos(self, row: str, name: str, videos, fps: float = 8.0) -> list[str]:
        from vldm.io import write_mp4

        d = self.out / "samples" / row / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return [str(write_mp4(d / f"clip_{i:03d}.mp4", v, fps)) for i, v in enumerate(videos)]

    def prediction_run(self) -> Path:
        """The prediction model of the prediction and rollout rows (trained once)."""
        if getattr(self, "_prediction_run", None) is None:
            self._prediction_run = self.train_stage(
                "configs/paper_predict.yaml", "prediction", self.plan.temporal_steps, self.image_ldm
            )
        return self._prediction_run

    def row_rollout(self):
        import numpy as np
        import torch

        from vldm.config.sample import SampleConfig
        from vldm.diffusion.sampler import decode_latents, encode_pixels
        from vldm.paper import metrics as M
        from vldm.paper.rows import bars_png, rollout_row
        from vldm.sample import stages
        from vldm.sample.api import Cascade, encode_prompts

        run = self.prediction_run()
        # the prediction model alone (a cascade may start from a predict run): no need of the demo's video run
        cascade = Cascade.from_runs(str(run), ema=True, device="cpu")
        comps, stage = cascade.components, cascade.keyframes
        prompts = [s["caption"] for _, s in self.truth]
        bgs = [s["background_rgb"] for _, s in self.truth]
        n, f = self.plan.rollout_frames, stage.clip_frames
        truth = self.truth_pixels(n)
        gt = self.to_u8(truth)
        z = encode_pixels(comps.vae, truth[:, :, :2])  # 2 true frames start it; the rest is the model's
        cfg = SampleConfig(steps=self.plan.sample_steps, guidance_scale=GUIDANCE)
        text = encode_prompts(cascade, comps, prompts, cfg)
        with torch.no_grad():
            lat = stages.rollout(stage, text, stages.Run(cfg, list(range(len(prompts)))), n, tuple(z.shape[-2:]), z)
        videos = self.to_u8(decode_latents(comps.vae, lat))
        windows = []
        for w0 in range(0, n - f + 1, f):
            sl = slice(w0, w0 + f)
            vw, gw = [v[sl] for v in videos], [g[sl] for g in gt]
            windows.append(
                {
                    "frames": [w0, w0 + f],
                    "accel": M.motion_summary(vw, bgs)["accel"],
                    "colour_drift": M.identity_summary(vw, bgs)["colour_drift"],
                    "area_drift": M.identity_summary(vw, bgs)["area_drift"],
                    "presence": M.identity_summary(vw, bgs)["presence"],
                    "trajectory_error": float(np.mean([M.trajectory_error(a, b, bg) for a, b, bg in zip(vw, gw, bgs)])),
                }
            )
        real = [g[:f] for g in gt]
        real_fig = {
            "accel": M.motion_summary(real, bgs)["accel"],
            "colour_drift": M.identity_summary(real, bgs)["colour_drift"],
            "area_drift": M.identity_summary(real, bgs)["area_drift"],
        }
        row = rollout_row(windows, real_fig)
        row.samples = self.save_videos("rollout", "model", videos)
        row.picture = str(
            bars_png(
                self.out / "rollout.png",
                f"rollout to {n} frames ({n // f}x the training clips), per window of {f} frames",
                {
                    k: {f"frames {w['frames'][0]}-{w['frames'][1] - 1}": w[k] for w in windows}
                    for k in ("accel", "colour_drift", "area_drift", "trajectory_error")
                },
            )
        )
        return row

    def row_prediction(self):
        import numpy as np
        import torch

        from vldm.config.sample import SampleConfig
        from vldm.diffusion.sampler import decode_latents, encode_pixels
        from vldm.paper import metrics as M
        from vldm.paper.rows import bars_png, prediction_row
        from vldm.sample import stages
        from vldm.sample.api import Cascade, encode_prompts

        run = self.prediction_run()
        # the prediction model alone (a cascade may start from a predict run): no need of the demo's video run
        cascade = Cascade.from_runs(str(run), ema=True, device="cpu")
        comps, stage = cascade.components, cascade.keyframes
        prompts = [s["caption"] for _, s in self.truth]
        bgs = [s["background_rgb"] for _, s in self.truth]
        f = stage.clip_frames
        truth = self.truth_pixels(f)
        gt = self.to_u8(truth)
        z = encode_pixels(comps.vae, truth)
        hw = tuple(z.shape[-2:])
        first = 2  # frames 2.. are generated for every S: the error is compared on the same frames

        def sample(s: int, cg: float):
            cfg = SampleConfig(steps=self.plan.sample_steps, guidance_scale=GUIDANCE, context_guidance=cg)
            run_ = stages.Run(cfg, list(range(len(prompts))))
            text = encode_prompts(cascade, comps, prompts, cfg)
            with torch.no_grad():
                if s == 0:
                    lat = stages.keyframes(stage, text, run_, f, hw)
                else:
                    lat = stages.rollout(stage, text, run_, f, hw, start=z[:, :, :s])
                return self.to_u8(decode_latents(comps.vae, lat))

        def figures(videos) -> dict:
            return {
                "trajectory_error": float(
                    np.mean([M.trajectory_error(v[first:], g[first:], b) for v, g, b in zip(videos, gt, bgs)])
                ),
                "identity": M.identity_summary(videos, bgs),
                "motion": M.motion_summary(videos, bgs),
            }

        by_s, by_cg, samples = {}, {}, []
        for s in (0, 1, 2):
            vids = sample(s, 1.5)
            by_s[s] = figures(vids)
            samples += self.save_videos("prediction", f"S{s}", vids)
        for cg in CONTEXT_GUIDANCE:
            by_cg[cg] = by_s[2] if cg == 1.5 else figures(sample(2, cg))
        real = {"identity": M.identity_summary(gt, bgs), "motion": M.motion_summary(gt, bgs)}
        row = prediction_row(by_s, by_cg, real)
        row.samples = samples
        row.metrics["train_steps"] = self.plan.temporal_steps
        row.picture = str(
            bars_png(
                self.out / "prediction.png",
                f"prediction: centroid error of frames {first}-{f - 1} vs the true continuation",
                {
                    "trajectory error by context frames S": {f"S={s}": by_s[s]["trajectory_error"] for s in by_s},
                    "trajectory error by context guidance (S=2)": {
                        f"scale {cg}": by_cg[cg]["trajectory_error"] for cg in by_cg
                    },
                    "colour drift": {
                        **{f"S={s}": by_s[s]["identity"]["colour_drift"] for s in by_s},
                        "real clips": real["identity"]["colour_drift"],
                    },
                },
            )
        )
        return row

    def row_interpolation(self):
        import numpy as np
        import torch

        from vldm.config.sample import SampleConfig
        from vldm.diffusion.sampler import decode_latents, encode_pixels
        from vldm.paper import metrics as M
        from vldm.paper.rows import bars_png, interpolation_row
        from vldm.sample import stages
        from vldm.sample.api import Cascade, encode_prompts

        run = self.train_stage(
            "configs/paper_interpolate.yaml", "interpolation", self.plan.temporal_steps, self.image_ldm
        )
        # the interpolator on the demo's image LDM run as the cascade's first stage (not sampled here; it brings
        # the same text encoder and VAE): the row needs no other temporal model trained
        cascade = Cascade.from_runs(str(self.demo / "runs" / "image"), interp_run=str(run), ema=True, device="cpu")
        comps, stage = cascade.components, cascade.interpolator
        factor = stages.interp_options(stage).factor
        n = factor + 1  # one window: key frames 0 and factor given, the frames between them generated
        prompts = [s["caption"] for _, s in self.truth]
        bgs = [s["background_rgb"] for _, s in self.truth]
        truth = self.truth_pixels(n)
        gt = self.to_u8(truth)
        keys = encode_pixels(comps.vae, truth[:, :, ::factor])
        cfg = SampleConfig(steps=self.plan.sample_steps, guidance_scale=GUIDANCE)
        text = encode_prompts(cascade, comps, prompts, cfg)
        with torch.no_grad():
            lat = stages.interpolate(stage, text, stages.Run(cfg, list(range(len(prompts)))), keys, 1, 8.0)
        model = self.to_u8(decode_latents(comps.vae, lat))
        # the baselines get the true key frames in pixels (no autoencoder loss): they are not handicapped
        repeat = [g[[0 if t <= factor // 2 else factor for t in range(n)]] for g in gt]
        fade = [
            np.stack([np.rint((1 - t / factor) * g[0] + t / factor * g[factor]).astype(np.uint8) for t in range(n)])
            for g in gt
        ]
        mid = slice(1, factor)

        def figures(videos) -> dict:
            return {
                "trajectory_error": float(
                    np.mean([M.trajectory_error(v[mid], g[mid], b) for v, g, b in zip(videos, gt, bgs)])
                ),
                "mask_iou": float(np.mean([M.mask_iou(v[mid], g[mid], b) for v, g, b in zip(videos, gt, bgs)])),
                "area_drift": M.identity_summary(videos, bgs)["area_drift"],
                "psnr_inbetween": float(np.mean([M.psnr(v[mid], g[mid]) for v, g in zip(videos, gt)])),
            }

        measured = {"model": figures(model), "nearest_key_frame": figures(repeat), "cross_fade": figures(fade)}
        measured["model"]["psnr_key_frames"] = float(
            np.mean([M.psnr(v[::factor], g[::factor]) for v, g in zip(model, gt)])
        )
        row = interpolation_row(measured["model"], measured["nearest_key_frame"], measured["cross_fade"])
        row.metrics["train_steps"] = self.plan.temporal_steps
        row.samples = self.save_videos("interpolation", "model", model) + self.save_videos("interpolation", "truth", gt)
        row.picture = str(
            bars_png(
                self.out / "interpolation.png",
                f"interpolation x{factor}: in-between frames vs ground truth",
                {
                    "centroid error (frame units)": {k: v["trajectory_error"] for k, v in measured.items()},
                    "mask IoU with the true frame": {k: v["mask_iou"] for k, v in measured.items()},
                    "area drift (relative)": {k: v["area_drift"] for k, v in measured.items()},
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
        # the decoder stage through the same launcher as every stage (plan.ranks local ranks, DDP over gloo)
        if not (self.reuse_runs and self.trained(run, steps)):
            shutil.rmtree(run, ignore_errors=True)
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
        clips = np.stack([v[: self.plan.clip_frames] for v, _ in self.truth])  # (b, f, h, w, 3) uint8
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

    def row_upsampler(self):
        from vldm.paper import upsampler

        return upsampler.row(self)

    def row_personalisation(self):
        from vldm.paper import personalisation

        return personalisation.row(self)

    def row_cascade(self):
        from vldm.paper import cascade

        return cascade.row(self)

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
            t0, c0 = time.perf_counter(), _cpu()
            row = fn()
            row.seconds = round(time.perf_counter() - t0, 1)
            row.cpu_seconds = round(_cpu() - c0, 1)
            self.say(f"  row {name}: shown={row.shown} in {row.seconds:.0f} s {row.note}")
            out.append(row)
        return out

    # ------------------------------------------------------------------ all
    def main(self) -> dict:
        from vldm.paper.rows import table, write_summary

        t_start = time.perf_counter()
        self._cpu0 = _cpu()
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"{self.plan.name} variant -> {self.out} (logs in {self.logs})")
        for name, fn in (("demo", self.run_demo), ("truth", self.make_truth)):
            t0, c0 = time.perf_counter(), _cpu()
            self.say(f"stage {name}")
            fn()
            self.timings[name] = round(time.perf_counter() - t0, 1)
            self.timings[f"{name}_cpu"] = round(_cpu() - c0, 1)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        try:
            rows = self.rows()
        finally:
            from vldm.paper.corpora import ray_down

            ray_down(self)  # the Ray cluster the extra corpora's shards started, if any
        wall = round(time.perf_counter() - t_start, 1)
        # CPU seconds of this process and every process it waited for (trainer ranks, the demo and its
        # children; not the Ray daemons' workers): a load-independent size of the run on a shared machine
        cpu = round(_cpu() - self._cpu0, 1)
        extra = {
            "cpu_seconds": cpu,
            "variant": self.plan.name,
            "plan": self.plan.__dict__,
            "demo": str(self.demo),
            "heldout_seed": HELDOUT_SEED,
            "timings_s": {**self.timings, **{r.name: r.seconds for r in rows if r.seconds}, "total": wall},
        }
        path = write_summary(self.out / "summary.json", rows, extra)
        print()
        print(table(rows))
        print(f"\nsummary  {path}\nsamples  {self.out / 'samples'}\nwall {wall:.0f} s, {cpu:.0f} CPU-seconds")
        return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--fast",
        action="store_true",
        default=os.environ.get("PAPER_FAST") == "1",
        help="the smoke-test variant: the fast demo, a few steps per model (default: $PAPER_FAST=1)",
    )
    ap.add_argument(
        "--out", default=os.environ.get("PAPER_OUT", "outputs/paper"), help="output directory (default: outputs/paper)"
    )
    ap.add_argument("--demo-dir", default=None, help="reuse a finished `make demo` output instead of running it")
    ap.add_argument("--rows", default=",".join(BUILT), help=f"rows to run (default: {','.join(BUILT)})")
    ap.add_argument(
        "--temporal-steps",
        type=int,
        default=None,
        help="steps of the prediction and interpolation models (default: the plan's, 800 in the full variant)",
    )
    ap.add_argument(
        "--reuse-runs",
        action="store_true",
        help="measure again without training again: keep a row's run in OUT/runs that has the plan's step count",
    )
    ap.add_argument("--decoder-steps", type=int, default=None, help="steps of the video decoder (default: the plan's)")
    ap.add_argument("--upsampler-steps", type=int, default=None, help="steps of each upsampler stage (default: 300)")
    ap.add_argument("--personalise-steps", type=int, default=None, help="steps of B's fine-tune (default: 150)")
    a = ap.parse_args(argv)
    rows = tuple(r for r in a.rows.split(",") if r)
    unknown = [r for r in rows if r not in BUILT]
    if unknown:
        ap.error(f"--rows: {unknown} not built (built: {', '.join(BUILT)})")
    try:
        plan = FAST if a.fast else FULL
        for field, v in (
            ("temporal_steps", a.temporal_steps),
            ("decoder_steps", a.decoder_steps),
            ("upsampler_steps", a.upsampler_steps),
            ("personalise_steps", a.personalise_steps),
        ):
            if v is not None:
                if v < 1:
                    ap.error(f"--{field.replace('_', '-')}: must be >= 1")
                plan = dataclasses.replace(plan, **{field: v})
        Paper(plan, Path(a.out), Path(a.demo_dir) if a.demo_dir else None, rows, a.reuse_runs).main()
    except (RuntimeError, FileNotFoundError) as e:
        print(f"[paper] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    return 0

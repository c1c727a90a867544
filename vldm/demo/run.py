"""The embedded demo (issue 7): the whole pipeline on one CPU machine, and the proof that the method learns.

    bash scripts/demo.sh            # = make demo; DEMO_FAST=1 for the ~3 minute variant of the test suite
    python -m vldm.demo [--fast] [--out outputs/demo]

Stages (each prints its progress; every command's full output is in OUT/logs/):
  1. corpus     data_prep/make_synthetic.py: one solid shape moving at constant velocity per video
  2. shards     a local Ray cluster (scripts/ray_local_up.sh) and `ray job submit ... data_prep/shard_videos.py`
  3. training   a tiny diffusers AutoencoderKL (vldm.demo.autoencoder) into the base model's vae/;
                the image LDM on frames (stage=image, configs/demo_image.yaml); the temporal layers
                (stage=temporal, configs/demo_temporal.yaml) with DeepSpeed on 2 ranks through
                slurm/train_temporal.sbatch: sbatch when a SLURM cluster answers, else bash
  4. eval       `ray job submit ... ray_jobs/eval_pool.py --once` over the video run's checkpoints
  5. samples    the same prompts and seeds in image mode (temporal layers skipped) and as video;
                motion metrics (vldm.demo.motion) of both and of held-out real clips; grid + summary.json
  6. table      printed, with where the W&B offline runs are
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vldm.local_ray import RAY_ADDRESS, ray_answers, start_local_ray, stop_local_ray

ROOT = Path(__file__).resolve().parents[2]
# trainer lines worth showing on the console (rank 0 logs every train.log_every steps)
TRAIN_PROGRESS = (
    r"\[vldm\.train .*\] (step |done|checkpoint .*final|stage=)|\[train_temporal .*\] (job|local)|Error|error:"
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo variant. The model shapes and optimiser settings live in configs/demo_*.yaml;
    a plan only says how much data and how many steps (the fast variant is a smoke test, not a result)."""

    name: str
    videos: int  # synthetic videos (train + held out)
    video_frames: int  # frames per synthetic video; clips of `clip_frames` are cut from them
    clip_frames: int
    clip_stride: int  # frames between clip starts: overlapping clips = more distinct training clips
    samples_per_shard: int
    ae_steps: int
    image_steps: int
    temporal_steps: int
    temporal_every: int  # checkpoint interval of the temporal run (the eval pool measures each)
    warmup_steps: int | None  # LR warm-up of both LDM stages (None = the configs' own)
    eval_samples: int
    num_prompts: int  # demo samples per mode (prompts are held-out captions, seeds 0..n-1)
    sample_steps: int
    real_clips: int


# 288 videos x 3 overlapping clips = 864 clips (72 held out); ~12 min of the 15 on 2 quiet cores is training
FULL = Plan(
    "full",
    videos=288,
    video_frames=16,
    clip_frames=8,
    clip_stride=4,
    samples_per_shard=72,
    ae_steps=400,
    image_steps=800,
    temporal_steps=800,
    temporal_every=400,
    warmup_steps=None,
    eval_samples=4,
    num_prompts=8,
    sample_steps=25,
    real_clips=32,
)
FAST = Plan(
    "fast",
    videos=48,
    video_frames=8,
    clip_frames=8,
    clip_stride=8,
    samples_per_shard=16,
    ae_steps=40,
    image_steps=20,
    temporal_steps=40,
    temporal_every=20,
    warmup_steps=2,
    eval_samples=2,
    num_prompts=2,
    sample_steps=8,
    real_clips=8,
)
GUIDANCE = 3.0  # text guidance of the demo samples: a moderate scale for a tiny model (SD's 7.5 untried here)


class Demo:
    def __init__(self, plan: Plan, out: Path, use_slurm: str = "auto", start_at: int = 1):
        self.plan, self.out, self.use_slurm, self.start_at = plan, out.resolve(), use_slurm, start_at
        self.py = sys.executable
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}
        self.info: dict = {}
        self.started_ray = False
        self.mem = None  # PeakMemory while main() runs
        self._prompts: list[str] | None = None
        self.env = dict(os.environ)
        venv_bin = str(Path(self.py).parent)
        self.env["PATH"] = venv_bin + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHON"] = self.py  # slurm/train_temporal.sbatch runs $PYTHON
        self.env.setdefault("WANDB_MODE", "offline")
        wandb_dir = self.out / "wandb"
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
        ):
            self.env.setdefault(var, str(wandb_dir / sub))
        self.env.setdefault("WANDB_SILENT", "true")
        self.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.env.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only cluster: see scripts/ray_local_up.sh
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    # ------------------------------------------------------------------ paths
    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def base(self) -> Path:
        return self.out / "models" / "base"

    @property
    def image_ldm(self) -> Path:
        return self.out / "models" / "image_ldm"

    @property
    def image_run(self) -> Path:
        return self.out / "runs" / "image"

    @property
    def video_run(self) -> Path:
        return self.out / "runs" / "video"

    # ------------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def stage(self, n: int, name: str, fn) -> None:
        if n < self.start_at:
            self.say(f"stage {n}/6: {name}: skipped (--start-at {self.start_at}: reusing {self.out})")
            return
        self.say(f"stage {n}/6: {name}")
        t0 = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        self.say(f"stage {n}/6 done in {self.timings[name]:.0f} s")

    def run(self, cmd: list[str], log: str, show: str | None = None, timeout: float | None = None) -> str:
        from vldm.demo.procs import run_logged

        return run_logged(cmd, self.logs / log, show, env=self.env, cwd=str(ROOT), timeout=timeout)

    # ------------------------------------------------------------------ 1. corpus
    def make_corpus(self) -> None:
        p = self.plan
        # one shape (the motion metric tracks one centroid), 1.3-2.6 px per frame at 32 px
        self.run(
            [
                self.py,
                "data_prep/make_synthetic.py",
                str(self.corpus),
                "--count",
                str(p.videos),
                "--size",
                "32",
                "--frames",
                str(p.video_frames),
                "--fps",
                "8",
                "--max-shapes",
                "1",
                "--min-speed",
                "0.04",
                "--max-speed",
                "0.08",
                "--seed",
                "0",
            ],
            "1_corpus.log",
            show=r"videos",
        )
        n = len(list(self.corpus.glob("*.mp4")))
        self.say(f"  {n} videos of {p.video_frames} frames at 32x32 in {self.corpus}")

    # ------------------------------------------------------------------ 2. Ray + shards
    def ray_up(self) -> None:
        if ray_answers():
            self.say(f"  Ray already up at {RAY_ADDRESS}: reusing it")
            return
        start_local_ray(self.env)
        self.started_ray = True
        if self.mem is not None:
            self.mem.add_ray()
        self.say(f"  started a local Ray head on 127.0.0.1 (dashboard + job server {RAY_ADDRESS})")

    def ray_job(self, args: list[str], log: str, show: str | None = None, timeout: float = 900) -> str:
        # --working-dir . uploads the checkout (outputs/ and .venv/ are git-ignored, so not uploaded);
        # the job's python is this venv's (PATH), and every path it gets is absolute.
        # a job's driver gets the cluster's environment, not ours: pass W&B's settings explicitly
        env_vars = {k: v for k, v in self.env.items() if k.startswith("WANDB_")}
        return self.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                RAY_ADDRESS,
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps({"env_vars": env_vars}),
                "--",
                "python",
                *args,
            ],
            log,
            show,
            timeout,
        )

    def make_shards(self) -> None:
        p = self.plan
        self.ray_up()
        self.ray_job(
            [
                "data_prep/shard_videos.py",
                str(self.corpus),
                str(self.shards),
                "--frames",
                str(p.clip_frames),
                "--fps",
                "8",
                "--size",
                "32",
                "--clip-stride",
                str(p.clip_stride),
                "--samples-per-shard",
                str(p.samples_per_shard),
                "--workers",
                "2",
                "--crf",
                "12",
            ],
            "2_shards.log",
            show=r"clips/s|Job .* succeeded|shards? complete|ERROR",
        )
        stats = json.loads((self.shards / "_stats.json").read_text())
        tars = sorted(self.shards.glob("*.tar"))
        self.info["shards"] = {
            "tars": len(tars),
            "stats": {k: stats.get(k) for k in ("inputs", "clips", "failed") if k in stats},
        }
        self.say(f"  {len(tars)} shards in {self.shards} (the last one is held out)")

    # ------------------------------------------------------------------ 3. training
    def train_autoencoder(self) -> None:
        # the random tiny SD-layout model (UNet from configs/demo_image.yaml, tiny CLIP text encoder);
        # its random vae/ is replaced by the trained autoencoder below
        self.run(
            [
                self.py,
                "-m",
                "vldm.demo.base_model",
                "--config",
                "configs/demo_image.yaml",
                "--out",
                str(self.base),
                "--vae-channels",
                "16,32,32",
            ],
            "3a_autoencoder.log",
            show=r"\[base_model\]",
        )
        self.run(
            [
                self.py,
                "-m",
                "vldm.demo.autoencoder",
                "--shards",
                str(self.shards),
                "--out",
                str(self.base / "vae"),
                "--steps",
                str(self.plan.ae_steps),
                "--channels",
                "16,32,32",
            ],
            "3a_autoencoder.log",
            show=r"\[autoencoder\]",
        )
        self.info["autoencoder"] = json.loads((self.base / "vae" / "train_report.json").read_text())

    def train(
        self, config: str, run_dir: Path, pretrained: Path, steps: int, every: int, log: str, slurm: bool
    ) -> None:
        overrides = [
            f"run_dir={run_dir}",
            f"model.pretrained={pretrained}",
            f"data.shards={self.shards}",
            f"train.max_steps={steps}",
            f"checkpoint.every={every}",
            f"train.log_every={max(1, min(50, steps // 10))}",
        ]
        if self.plan.warmup_steps is not None:
            overrides.append(f"optim.warmup_steps={self.plan.warmup_steps}")
        script = "slurm/train_temporal.sbatch"
        if slurm:
            from vldm.demo.slurm import submit_and_wait

            submit_and_wait(script, [config, *overrides], self.logs / log, self.env, str(ROOT), show=TRAIN_PROGRESS)
        else:
            self.run(["bash", script, config, *overrides], log, show=TRAIN_PROGRESS)

    def assemble_image_ldm(self) -> None:
        """The frozen image LDM of the temporal stage: the base model with the trained UNet (EMA weights)."""
        from vldm.checkpoint import UNET_DIR, UNET_EMA_DIR, latest_checkpoint

        ck = latest_checkpoint(self.image_run)
        if ck is None:
            raise RuntimeError(f"no complete checkpoint in {self.image_run}")
        unet = ck / (UNET_EMA_DIR if (ck / UNET_EMA_DIR).exists() else UNET_DIR)
        tmp = self.image_ldm.with_name(f".{self.image_ldm.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(self.base / sub, tmp / sub)
        shutil.copytree(unet, tmp / "unet")
        shutil.rmtree(self.image_ldm, ignore_errors=True)
        os.replace(tmp, self.image_ldm)
        self.info["image_ldm"] = {"from": str(unet)}
        self.say(f"  image LDM = {self.base.name} + {unet.relative_to(self.out)} -> {self.image_ldm}")

    def slurm_ok(self) -> bool:
        from vldm.demo.slurm import cluster_ready

        if self.use_slurm == "0":
            return False
        ready = cluster_ready(min_nodes=2)
        if self.use_slurm == "1" and not ready:
            raise RuntimeError("DEMO_SLURM=1 but no SLURM cluster with 2 idle nodes answers")
        return ready

    def training(self) -> None:
        p = self.plan
        self.say("  3a: autoencoder (diffusers AutoencoderKL, L1 + KL) on training frames")
        self.train_autoencoder()
        ae = self.info["autoencoder"]
        self.say(f"  autoencoder: PSNR {ae['psnr_db']:.1f} dB, latents {ae['latent_shape']}, {ae['seconds']:.0f} s")
        self.say(f"  3b: image LDM on frames (stage=image, {p.image_steps} steps, 2 local ranks)")
        self.train(
            "configs/demo_image.yaml",
            self.image_run,
            self.base,
            p.image_steps,
            p.image_steps,
            "3b_image.log",
            slurm=False,
        )
        self.assemble_image_ldm()
        slurm = self.slurm_ok()
        how = (
            "sbatch on the local SLURM cluster (2 nodes)"
            if slurm
            else "bash slurm/train_temporal.sbatch (no SLURM: 2 local ranks)"
        )
        self.say(f"  3c: temporal layers (stage=temporal, {p.temporal_steps} steps, DeepSpeed ZeRO-2) via {how}")
        self.train(
            "configs/demo_temporal.yaml",
            self.video_run,
            self.image_ldm,
            p.temporal_steps,
            p.temporal_every,
            "3c_temporal.log",
            slurm=slurm,
        )
        self.info["temporal_launcher"] = "sbatch" if slurm else "bash"

    # ------------------------------------------------------------------ 4. eval pool
    def evaluate(self) -> None:
        p = self.plan
        prompts = ",".join(self.prompts()[:4])
        self.ray_up()
        self.ray_job(
            [
                "ray_jobs/eval_pool.py",
                "--run-dir",
                str(self.video_run),
                "--once",
                "--suite",
                "configs/eval/tiny.yaml",
                f"sampling.num_samples={p.eval_samples}",
                "sampling.variants=ema",
                f"sampling.prompts={prompts}",
                f"val_loss.data={self.holdout_shard()}",
                f"val_loss.num_clips={min(8, p.real_clips)}",
                "pool.num_workers=2",
                f"pool.shard_size={max(1, p.eval_samples // 2)}",
            ],
            "4_eval.log",
            show=r"\[eval\]|succeeded|failed",
        )
        report = self.run([self.py, "-m", "vldm.eval.report", str(self.video_run)], "4_eval_report.log")
        print("\n".join("    " + line for line in report.rstrip().splitlines()), flush=True)
        self.info["eval_report"] = report

    # ------------------------------------------------------------------ 5. samples and motion
    def holdout_shard(self) -> Path:
        return sorted(self.shards.glob("*.tar"))[-1]

    def real_clips(self, n: int) -> tuple[list, list[str]]:
        """Up to n held-out clips (uint8 (F, H, W, 3)) and their captions, via the training loader's holdout split."""
        import numpy as np

        from vldm.config.data import DataConfig
        from vldm.data import build_loader

        cfg = DataConfig(
            shards=str(self.shards),
            num_frames=self.plan.clip_frames,
            size=32,
            batch_size=1,
            shuffle_buffer=0,
            clip_start="start",
            holdout_shards=1,
            drop_last=False,
        )
        clips, caps = [], []
        for batch in build_loader(cfg, split="holdout"):
            for v, c in zip(batch["pixels"], batch["captions"]):
                clips.append(((v.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
                caps.append(c)
            if len(clips) >= n:
                break
        return clips[:n], caps[:n]

    def prompts(self) -> list[str]:
        """The demo's prompts: captions of held-out clips (the eval pool samples the first four too)."""
        if self._prompts is None:
            # overlapping clips of one video share its caption: keep distinct captions, in held-out order
            caps = self.real_clips(4 * self.plan.num_prompts)[1]
            self._prompts = list(dict.fromkeys(caps))[: self.plan.num_prompts]
        return self._prompts

    def samples(self) -> None:
        import numpy as np
        import torch

        from vldm.demo.motion import motion_stats
        from vldm.demo.summary import grid_image, save_png
        from vldm.sample.api import Cascade, generate

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # see scripts/demo.sh
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars of the tiny text encoder
        p = self.plan
        prompts = self.prompts()
        seeds = list(range(len(prompts)))
        cascade = Cascade.from_runs(str(self.video_run), ema=True, device="cpu")
        videos: dict[str, list[np.ndarray]] = {}
        for mode, image_mode in (("image_model", True), ("video_model", False)):
            t0 = time.perf_counter()
            out = generate(
                cascade,
                prompts,
                seeds=seeds,
                progress=False,
                num_frames=p.clip_frames,
                steps=p.sample_steps,
                guidance_scale=GUIDANCE,
                image_mode=image_mode,
            )
            d = self.out / "samples" / mode
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            out.save(d / "sample.mp4" if len(prompts) > 1 else d / "sample_000.mp4")
            u8 = ((out.videos.permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            videos[mode] = list(u8)
            self.say(
                f"  {mode}: {len(prompts)} videos x {p.clip_frames} frames in {time.perf_counter() - t0:.0f} s -> {d}"
            )
        real, _ = self.real_clips(p.real_clips)
        self.motion = {
            "image_model": motion_stats(videos["image_model"]),
            "video_model": motion_stats(videos["video_model"]),
            "real_clips": motion_stats(real),
        }
        self.grid = save_png(grid_image(videos["image_model"], videos["video_model"]), self.out / "grid.png")
        self.say(f"  grid -> {self.grid}")

    # ------------------------------------------------------------------ 6. summary
    def wandb_runs(self) -> list[str]:
        root = Path(self.env["WANDB_DIR"]) / "wandb"
        return sorted(str(p) for p in root.glob("offline-run-*")) if root.is_dir() else []

    def summarize(self, t_start: float) -> dict:
        from vldm.demo.summary import table, verdict, write_summary

        m = self.motion
        v = verdict(m["image_model"], m["video_model"], m["real_clips"])
        wall = time.perf_counter() - t_start
        data = {
            "variant": self.plan.name,
            "motion": {k: s.as_dict() for k, s in m.items()},
            "verdict": v,
            "prompts": self.prompts(),
            "seeds": list(range(len(self.prompts()))),
            "samples": {
                k: sorted(str(p) for p in (self.out / "samples" / k).glob("*.mp4"))
                for k in ("image_model", "video_model")
            },
            "grid": str(self.grid),
            "wandb_runs": self.wandb_runs(),
            "runs": {"image": str(self.image_run), "video": str(self.video_run)},
            "timings_s": {**self.timings, "total": round(wall, 1)},
            "peak_rss_gb": round(self.mem.peak_bytes / 2**30, 2) if self.mem is not None else None,
            "plan": dataclasses.asdict(self.plan),
            **{k: val for k, val in self.info.items() if k != "eval_report"},
        }
        write_summary(self.out / "summary.json", data)
        print()
        print(
            table(
                {
                    "image model (per frame)": m["image_model"],
                    "video model": m["video_model"],
                    "real clips (held out)": m["real_clips"],
                }
            )
        )
        print("\naccel = median |c[t+1] - 2c[t] + c[t-1]| of the shape's centroid (frame units): 0 = constant velocity")
        closer = (
            "video model far closer" if v["far_closer"] else "video model closer" if v["video_closer"] else "NOT closer"
        )
        print(
            f"video model's gap to real clips: {v['accel_gap_video']:.4f} vs image model's {v['accel_gap_image']:.4f}"
            f" ({closer})"
        )
        print(f"\nsummary  {self.out / 'summary.json'}\ngrid     {self.grid}\nsamples  {self.out / 'samples'}")
        for r in data["wandb_runs"]:
            print(f"W&B run  {r}   (upload later: wandb sync {r})")
        print(f"wall {wall:.0f} s, peak RSS {data['peak_rss_gb']} GB (sum over the demo's processes)")
        return data

    # ------------------------------------------------------------------ all
    def main(self) -> dict:
        from vldm.demo.procs import PeakMemory

        t_start = time.perf_counter()
        if self.start_at <= 1:
            shutil.rmtree(self.out, ignore_errors=True)  # every demo starts from nothing
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"{self.plan.name} variant -> {self.out} (logs in {self.logs})")
        with PeakMemory() as self.mem:
            try:
                self.stage(1, "corpus", self.make_corpus)
                self.stage(2, "shards", self.make_shards)
                self.stage(3, "training", self.training)
                self.stage(4, "eval", self.evaluate)
                self.stage(5, "samples", self.samples)
                self.say("stage 6/6: summary")
                return self.summarize(t_start)
            finally:
                self.ray_down()

    def ray_down(self) -> None:
        if self.started_ray and os.environ.get("VLDM_KEEP_CLUSTERS") != "1":
            stop_local_ray(self.env)
            self.say("  stopped the Ray cluster the demo started")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--fast",
        action="store_true",
        default=os.environ.get("DEMO_FAST") == "1",
        help="the ~3 minute smoke-test variant (default: $DEMO_FAST=1)",
    )
    ap.add_argument(
        "--out", default=os.environ.get("DEMO_OUT", "outputs/demo"), help="output directory (default: outputs/demo)"
    )
    ap.add_argument(
        "--slurm",
        choices=("auto", "0", "1"),
        default=os.environ.get("DEMO_SLURM", "auto"),
        help=(
            "temporal stage through sbatch: auto = when a SLURM cluster with 2 idle nodes answers (default: "
            "$DEMO_SLURM or auto)"
        ),
    )
    ap.add_argument(
        "--start-at",
        type=int,
        default=1,
        metavar="N",
        help="skip stages before N and reuse their outputs in --out (default: 1 = start from nothing)",
    )
    a = ap.parse_args(argv)
    from vldm.demo.procs import StageFailed

    try:
        Demo(FAST if a.fast else FULL, Path(a.out), a.slurm, a.start_at).main()
    except StageFailed as e:
        print(f"[demo] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    return 0

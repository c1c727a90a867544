"""Training throughput, memory, scaling and checkpoint cost of `python -m vldm.train`.

CPU (always): the tiny config and a mid-size one (64/128/256 channels, 8 frames of 32x32 latents) at
1 and 2 ranks on this machine, through the real launcher (`bash slurm/train_temporal.sbatch`, DeepSpeed
ZeRO-2 over gloo, 1 thread per rank, synthetic latents): steady step time, clips/s, peak RSS per rank,
weak-scaling ratio (2-rank / 1-rank clips/s at the same per-rank batch; 2.0 is perfect), checkpoint
size against the full model's fp32 size, save and restore times (a second 2-rank run resumes from the
first one's checkpoint). Also the checkpoint budget of the SD-1.5 temporal model, from its parameter
counts (built on the meta device: no memory, no weights).

GPU (when CUDA is available, skipped otherwise): the SD-1.5 temporal config (SD-1.5 UNet shape, random
spatial weights unless --sd15 points at a real model directory; a 77-token text context), 16x40x64
latents, bf16, micro-batch 1, for each activation-checkpointing level (off, temporal, block): step time,
perf/mfu (model FLOPs from the FLOP counter / bf16 dense peak), TFLOP/s, peak memory, and the attention
kernel in use.

    python bench/bench_train.py [--skip-cpu] [--cpu-steps 20] [--gpu-steps 12] [--sd15 PATH] \
[--out outputs/bench/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train_temporal.sbatch"
TINY = ROOT / "configs" / "tiny_cpu.yaml"

CPU_CONFIGS = {
    "tiny": ["data.batch_size=2"],
    "mid": [
        "model.unet.block_out_channels=[64,128,256]",
        "model.unet.layers_per_block=2",
        "model.unet.norm_num_groups=32",
        "model.unet.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D]",
        "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D]",
        "model.unet.cross_attention_dim=128",
        "data.num_frames=8",
        "data.size=32",
        "data.batch_size=1",
    ],
}
SD15_UNET = [
    "model.unet.block_out_channels=[320,640,1280,1280]",
    "model.unet.layers_per_block=2",
    "model.unet.cross_attention_dim=768",
    "model.unet.attention_head_dim=8",
    "model.unet.norm_num_groups=32",
    "model.unet.sample_size=64",
    "model.unet.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D]",
]


def env_for(nproc: int) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        PYTHON=sys.executable, NPROC=str(nproc), OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1"
    )
    return env


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_cpu(run: Path, overrides: list[str], nproc: int, steps: int) -> dict:
    args = [f"run_dir={run}", f"train.max_steps={steps}", "checkpoint.every=100000", "wandb.mode=disabled", *overrides]
    t0 = time.perf_counter()
    p = subprocess.run(
        ["bash", str(SBATCH), str(TINY), *args], cwd=ROOT, env=env_for(nproc), capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rows = read_metrics(run)
    steps_rows = [m for m in rows if "perf/step_time_s" in m]
    steady = [m["perf/step_time_s"] for m in steps_rows if m["step"] > 2] or [m["perf/step_time_s"] for m in steps_rows]
    m = re.search(r"([\d.]+)M trainable, ([\d.]+)M frozen", p.stdout)
    ckpt = max((r for r in rows if "ckpt/save_s" in r), key=lambda r: r["step"])
    step_t = statistics.median(steady)
    clips = steps_rows[-1]["train/clips_seen"] / steps_rows[-1]["step"]  # global clips per step
    return {
        "ranks": nproc,
        "step_s": step_t,
        "clips_per_s": clips / step_t,
        "peak_rss_gb": max(r["perf/peak_mem_gb"] for r in steps_rows),
        "data_wait": statistics.median(r["perf/data_wait_frac"] for r in steps_rows),
        "trainable_m": float(m.group(1)),
        "frozen_m": float(m.group(2)),
        "ckpt_gb": ckpt["ckpt/size_gb"],
        "save_s": ckpt["ckpt/save_s"],
        "wall_s": wall,
        "tflops_per_rank": statistics.median(r.get("perf/tflops_per_gpu", 0) for r in steps_rows),
    }


def restore_time(run: Path, overrides: list[str], nproc: int, steps: int) -> float:
    """Resume the finished run for one more step; the trainer logs the restore time."""
    args = [
        f"run_dir={run}",
        f"train.max_steps={steps + 1}",
        "checkpoint.every=100000",
        "wandb.mode=disabled",
        *overrides,
    ]
    p = subprocess.run(
        ["bash", str(SBATCH), str(TINY), *args], cwd=ROOT, env=env_for(nproc), capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    return next(r["ckpt/restore_s"] for r in read_metrics(run) if "ckpt/restore_s" in r)


def sd15_budget() -> dict:
    """Parameter counts of the SD-1.5 temporal model and what a checkpoint of it holds (bytes/param)."""
    import torch
    from diffusers import UNet2DConditionModel

    from vldm.config import Config, build_config
    from vldm.models import VideoLDMUNet

    cfg = build_config(Config, [], SD15_UNET)
    with torch.device("meta"):
        model = VideoLDMUNet.from_unet2d(UNet2DConditionModel(**cfg.model.unet.diffusers_kwargs()))
    t = sum(p.numel() for p in model.temporal_parameters())
    f = sum(p.numel() for p in model.spatial_parameters())
    ours = t * (4 + 4 + 2 + 12)  # temporal + EMA fp32, DeepSpeed bf16 module copy, fp32 master + Adam m, v
    return {
        "temporal_params_m": t / 1e6,
        "spatial_params_m": f / 1e6,
        "full_model_fp32_gb": (t + f) * 4 / 1e9,
        "checkpoint_gb": ours / 1e9,
        "with_frozen_params_gb": (ours + f * 2) / 1e9,
        "weights_only_gb": t * 8 / 1e9,
    }


def cpu_section(steps: int, out: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        for name, overrides in CPU_CONFIGS.items():
            n = steps if name == "tiny" else max(6, steps // 3)
            res = {}
            for nproc in (1, 2):
                # the same clips per rank at 1 and 2 ranks: weak scaling
                res[nproc] = run_cpu(work / f"{name}{nproc}", overrides, nproc, n)
                print(
                    f"  {name} {nproc} rank(s): {res[nproc]['step_s']:.3f} s/step  {res[nproc]['clips_per_s']:.2f} "
                    "clips/s",
                    flush=True,
                )
            res[2]["restore_s"] = restore_time(work / f"{name}2", overrides, 2, n)
            full_gb = (res[1]["trainable_m"] + res[1]["frozen_m"]) * 1e6 * 4 / 2**30
            out["cpu"][name] = {
                "1": res[1],
                "2": res[2],
                "scaling_2_over_1": res[2]["clips_per_s"] / res[1]["clips_per_s"],
                "full_model_fp32_gb": full_gb,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def vae_share(steps: int = 3) -> dict:
    """What latent shards save: one training step of the tiny model on pixels (its VAE encodes every clip in
    the step) against the same step on latents, in this process (time ratio) and in FLOPs (the VAE's share
    of the step's FLOPs, counted by vldm.train.perf.train_flops). CPU, tiny VAE factor 4 at 64x64 pixels."""
    import torch

    from vldm.config import Config, build_config
    from vldm.models.base import build_tiny_base
    from vldm.train.build import build
    from vldm.train.objective import Objective
    from vldm.train.perf import train_flops
    from vldm.train.sources import SyntheticClips

    work = Path(tempfile.mkdtemp(prefix="bench_vae_"))
    try:
        base = build_tiny_base(work / "base")
        cfg = build_config(Config, [str(TINY)], [f"model.pretrained={base}", "data.size=64", "data.batch_size=2"])
        built = build(cfg)
        obj = Objective(cfg, built, torch.device("cpu"))
        f = cfg.data.num_frames
        px = next(SyntheticClips(cfg, 0, 1, 3, 64, 64, "pixels"))
        lat = {**px, "latents": obj.latents(px)}
        lat.pop("pixels")

        def step(batch) -> float:
            t0 = time.perf_counter()
            obj.loss(built.model, batch, 0, 0, 0)[0].backward()
            built.model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step(px), step(lat)  # warm-up
        t_px = statistics.median(step(px) for _ in range(steps))
        t_lat = statistics.median(step(lat) for _ in range(steps))
        fl = train_flops(lambda: obj.loss(built.model, px, 0, 0, 0)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "frames": f,
        "pixels": [64, 64],
        "step_pixels_s": t_px,
        "step_latents_s": t_lat,
        "vae_time_share": 1 - t_lat / t_px,
        "vae_flop_share": fl.encoders / (fl.encoders + fl.trained),
    }


# ------------------------------------------------------------------------------------------------ GPU
def gpu_child(level: str, steps: int, sd15: str, result_path: str) -> None:
    """One training process on the GPU at one checkpointing level (DeepSpeed is initialised once per process)."""
    import torch

    from vldm.config import Config, build_config
    from vldm.train.sources import SyntheticClips
    from vldm.train.trainer import train

    run = Path(tempfile.mkdtemp(prefix=f"bench_gpu_{level}_"))
    # a real SD-1.5 directory: 320x512 pixels through its VAE factor 8 = 40x64 latents; random weights of the
    # same shape (no VAE): the synthetic latents are 40x64 directly
    model = (
        [f"model.pretrained={sd15}", "data.size=320", "data.width=512"]
        if sd15
        else ["model.pretrained=", *SD15_UNET, "data.size=40", "data.width=64"]
    )
    cfg = build_config(
        Config,
        [str(ROOT / "configs" / "sd15_t2v.yaml")],
        [
            *model,
            f"run_dir={run}",
            "data.shards=",
            "data.num_frames=16",
            "data.batch_size=1",
            "data.use_latents=true",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "train.grad_accum=1",
            "checkpoint.every=100000",
            f"model.temporal.gradient_checkpointing={level}",
            "deepspeed.precision=bf16",
            "wandb.mode=disabled",
            "optim.warmup_steps=0",
        ],
    )
    # 16 x 40 x 64 latents directly (no VAE); a 77-token text context as SD's CLIP gives
    source = SyntheticClips(cfg, 0, 1, 4, 40, 64, "latents", 0, text_shape=(77, 768)) if not sd15 else None
    try:
        code = train(cfg, source=source)
        rows = [m for m in read_metrics(run) if "perf/step_time_s" in m and m["step"] > 2]
        res = {
            "level": level,
            "exit": code,
            "step_s": statistics.median(r["perf/step_time_s"] for r in rows),
            "mfu": statistics.median(r.get("perf/mfu", 0.0) for r in rows),
            "tflops": statistics.median(r.get("perf/tflops_per_gpu", 0.0) for r in rows),
            "peak_mem_gb": max(r["perf/peak_mem_gb"] for r in rows),
            "save_s": next((r["ckpt/save_s"] for r in read_metrics(run) if "ckpt/save_s" in r), None),
        }
    except torch.cuda.OutOfMemoryError:
        res = {"level": level, "exit": "OOM"}
    finally:
        shutil.rmtree(run, ignore_errors=True)
    Path(result_path).write_text(json.dumps(res))


def gpu_section(steps: int, sd15: str, out: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device")
        out["gpu"] = "skipped: no CUDA device"
        return
    from vldm.models.attention import _flash_attn_func

    kernel = (
        "flash-attn 2"
        if _flash_attn_func is not None
        else ("torch SDPA (flash kernel enabled)" if torch.backends.cuda.flash_sdp_enabled() else "torch SDPA")
    )
    gpu = {"device": torch.cuda.get_device_name(0), "attention_kernel": kernel, "levels": []}
    for level in ("off", "temporal", "block"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--gpu-child",
                level,
                "--gpu-steps",
                str(steps),
                "--sd15",
                sd15 or "",
                "--child-out",
                path,
            ],
            env=env,
            check=False,
        )
        try:
            res = json.loads(Path(path).read_text() or "{}")
        except json.JSONDecodeError:
            res = {}
        res = res or {"level": level, "exit": "crashed (OOM?)"}
        gpu["levels"].append(res)
        print(f"  checkpointing={level}: {res}", flush=True)
    out["gpu"] = gpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-steps", type=int, default=20, help="steps of the tiny runs (mid-size: a third, at least 6)")
    ap.add_argument("--gpu-steps", type=int, default=12, help="steps per GPU run (the first 2 are not timed)")
    ap.add_argument(
        "--sd15",
        default="",
        help="local SD-1.5 diffusers directory for the GPU section (default: random weights, same shape)",
    )
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    ap.add_argument("--vae-share-only", action="store_true", help="only the VAE share of a step (CPU, seconds)")
    ap.add_argument("--out", default="outputs/bench/train.json", help="where the JSON results go")
    ap.add_argument("--gpu-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.gpu_child:
        gpu_child(a.gpu_child, a.gpu_steps, a.sd15, a.child_out)
        return 0
    out: dict = {
        "cpu": {},
        "host": {
            "cores": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M"),
            "load_avg_at_start": os.getloadavg()[0],
        },
    }
    print("SD-1.5 temporal model, checkpoint budget (from parameter counts):", flush=True)
    out["sd15_budget"] = sd15_budget()
    print("  " + json.dumps({k: round(v, 2) for k, v in out["sd15_budget"].items()}), flush=True)
    if a.vae_share_only or not a.skip_cpu:
        print("VAE share of a step that latent shards remove (tiny, CPU, in process):", flush=True)
        out["vae_share"] = vae_share()
        print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out["vae_share"].items()}))
    if not a.skip_cpu and not a.vae_share_only:
        print("CPU (DeepSpeed ZeRO-2 over gloo, 1 thread per rank, synthetic latents):", flush=True)
        cpu_section(a.cpu_steps, out)
        print(
            "\n| config | ranks | s/step | clips/s | peak RSS/rank GB | data wait | ckpt MB | full model fp32 MB | "
            "save s | restore s | 2/1 scaling |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in out["cpu"].items():
            for n in ("1", "2"):
                x = r[n]
                tail = f"{x['restore_s']:.2f} | {r['scaling_2_over_1']:.2f}" if n == "2" else " | "
                print(
                    f"| {name} | {n} | {x['step_s']:.3f} | {x['clips_per_s']:.2f} | {x['peak_rss_gb']:.2f} | "
                    f"{x['data_wait']:.1%} | "
                    f"{x['ckpt_gb'] * 1024:.1f} | {r['full_model_fp32_gb'] * 1024:.1f} | {x['save_s']:.2f} | {tail} |"
                )
    if not a.vae_share_only:
        print("GPU (SD-1.5 temporal, 16x40x64 latents, bf16, micro-batch 1):", flush=True)
        gpu_section(a.gpu_steps, a.sd15, out)
    out["host"]["load_avg_at_end"] = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

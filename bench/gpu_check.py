"""GPU bring-up in one command (`make gpu-check`): unattended, on one fresh GPU, in under 6 minutes.

Made for the machine this project is lent now and then: one H200, Python 3.12, torch (CUDA), transformers,
einops, safetensors and triton, but no diffusers, deepspeed, ray, PyAV or wandb, and no package registry.
`scripts/gpu_wheels.sh` (run where PyPI works) puts the wheels this check needs into `.gpu_wheels/`, which
travels with the working tree; `make gpu-check` installs them offline (`pip install --no-index
--find-links .gpu_wheels`) and runs this script. Parts that need what is not there are skipped and say so.

What it runs and reports (one JSON file + a printed table):
1. the `gpu` tests (`pytest -m gpu`): bf16 identity at init, the SD-1.5-scale train step at each
   checkpointing level, chunked high-resolution temporal attention, the attention decision on CUDA tensors;
2. the SD-1.5-shape temporal training step (SD-1.5 UNet shape with random weights, built from the config:
   nothing downloaded) on 16x40x64 latents with a 77x768 text context, bf16 module with fp32 master weights
   and fused AdamW and the EMA updated from the masters (what DeepSpeed's bf16 mode and the trainer do on
   one GPU; DeepSpeed itself is not on that machine, so the EMA sharded over ZeRO partitions is tested on
   CPU only: tests/test_ema_masters.py),
   data from the synthetic source through the pinned, prefetching host-to-device path, for each
   checkpointing level (off / temporal / block): s/step, peak memory, MFU of the trained computation
   (vldm.train.perf.train_flops), data wait share;
3. sampling: s/video of 16x40x64 latents, DDIM with classifier-free guidance (2 model calls per step),
   then the decode of the 16 frames by a VAE of SD's shape (random weights).

    python bench/gpu_check.py [--out outputs/gpu_check.json] [--steps 8] [--sample-steps 25]
    python bench/gpu_check.py --tiny --device cpu     # the same code end to end on the tiny model (< 60 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the SD-1.5 UNet (diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5), as overrides
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
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0)
# what each part needs besides torch; the check reports the missing ones instead of failing
NEEDS = {"diffusers": "the UNet and VAE classes", "pytest": "the gpu tests"}
NOT_USED = ("deepspeed", "ray", "av", "wandb")  # parts of the project that need these are not run here


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def environment(device) -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "modules": {m: have(m) for m in (*NEEDS, "flash_attn", "triton", *NOT_USED)},
    }
    if have("diffusers"):
        import diffusers

        env["diffusers"] = diffusers.__version__
    return env


# ---------------------------------------------------------------------------------------------- 1. tests
def run_gpu_tests(timeout: float) -> dict:
    if not have("pytest"):
        return {"status": "skipped: pytest is not installed"}
    files = ["tests/test_models_gpu.py", "tests/test_gpu_ready.py"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_pt_") as tmp:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--basetemp={tmp}", *files]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[2:])}
    tail = (p.stdout + p.stderr).strip().splitlines()
    summary = next((x for x in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)", x)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {
        "status": "ok" if p.returncode in (0, 5) and not counts.get("failed") else f"exit {p.returncode}",
        "counts": counts,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
        "tail": tail[-40:] if p.returncode not in (0, 5) else [],
    }


# ------------------------------------------------------------------------------------------- 2. training
def model_config(tiny: bool, frames: int, h: int, w: int):
    from vldm.config import Config, build_config

    model = [] if tiny else [str(ROOT / "configs" / "sd15_t2v.yaml")]
    over = [
        "model.pretrained=",
        "data.shards=",
        f"data.num_frames={frames}",
        f"data.size={h}",
        f"data.width={w}",
        "data.batch_size=1",
        "data.use_latents=true",
        "diffusion.text_dropout=0.1",
        "wandb.mode=disabled",
    ]
    return build_config(Config, model, ([] if tiny else SD15_UNET) + over)


def train_levels(cfg, device, dtype, levels, steps: int, warmup: int, text_shape) -> tuple[list[dict], object]:
    """The temporal step at each checkpointing level on one model (built once: building SD-1.5 takes a while)."""
    import torch

    from vldm.train.build import apply_device_options, build
    from vldm.train.ema import EMA
    from vldm.train.engine import build_optimizer
    from vldm.train.objective import Objective
    from vldm.train.perf import peak_memory_gb, peak_tflops, train_flops
    from vldm.train.prefetch import DevicePrefetcher
    from vldm.train.sources import SyntheticClips

    t0 = time.perf_counter()
    built = build(cfg)
    model = built.model.to(device, dtype)  # the module in the training precision, as DeepSpeed casts it
    build_s = time.perf_counter() - t0
    objective = Objective(cfg, built, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, trainable = [n for n, _ in named], [p for _, p in named]
    h, w = cfg.data.hw
    peak = peak_tflops(device) * 1e12
    out = []
    for level in levels:
        ckpt, _, fast = level.partition("+")  # e.g. temporal+fast: + train.compile and train.channels_last
        model.set_gradient_checkpointing(ckpt)
        model.train()
        model.unet.eval()
        res: dict = {"level": level}
        try:
            if fast:
                on = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True, channels_last=True))
                res["applied"] = apply_device_options(model, on, device)  # in place: keep it the last level
            source = SyntheticClips(cfg, 0, 1, 4, h, w, "latents", 0, text_shape=text_shape)
            probe = next(SyntheticClips(cfg, 0, 1, 4, h, w, "latents", 0, text_shape=text_shape))
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                flops = train_flops(lambda b=probe: objective.loss(model, b, step=-1, micro=0, rank=0)[0])
            # fp32 master weights + AdamW on them, the bf16 module updated from them (DeepSpeed's bf16 mode)
            master = [p.detach().float().clone().requires_grad_(True) for p in trainable]
            optim = build_optimizer(master, cfg, device)
            # the EMA of the fp32 masters, as the trainer keeps it (one GPU: its partition is everything)
            ema = EMA(list(zip(names, master)), cfg.train.ema_decay)
            data = DevicePrefetcher(source, device, ahead=True, pin=device.type == "cuda")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times, waits = [], []
            for i in range(warmup + steps):
                t_step = time.perf_counter()
                batch = next(data)
                wait = time.perf_counter() - t_step
                loss, _ = objective.loss(model, batch, step=i, micro=0, rank=0)
                loss.backward()
                for m, p in zip(master, trainable):
                    m.grad = p.grad.float()
                    p.grad = None
                optim.step()
                optim.zero_grad(set_to_none=True)
                ema.update()
                with torch.no_grad():
                    torch._foreach_copy_(trainable, master)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a benchmark: each step timed to its end
                if i >= warmup:
                    times.append(time.perf_counter() - t_step)
                    waits.append(wait)
            times.sort()
            step_s = times[len(times) // 2]
            res.update(
                status="ok",
                step_s=step_s,
                peak_mem_gb=peak_memory_gb(device),
                data_wait=sum(waits) / sum(times),
                trained_tflop=flops.trained / 1e12,
                flops={k: getattr(flops, k) for k in ("forward", "backward", "recompute", "encoders")},
                tflops=flops.trained / step_s / 1e12,
                mfu=flops.trained / step_s / peak if peak else None,
                loss=float(loss.detach()),
            )
            res["ema_updates"] = ema.num_updates
            del master, optim, ema, data, loss
        except torch.cuda.OutOfMemoryError:
            res.update(status="OOM")
        except Exception as e:  # noqa: BLE001 - one level failing must not lose the others' figures
            res.update(status=f"error: {type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        for p in trainable:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res["build_s"] = build_s
        out.append(res)
        print(f"  checkpointing={level}: {short(res)}", flush=True)
    return out, built


# ------------------------------------------------------------------------------------------- 3. sampling
def sample_video(built, cfg, device, dtype, steps: int, vae_kw: dict, text_shape) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from vldm.diffusion import decode_latents, encode_pixels
    from vldm.sample.guidance import Conditioning, denoise

    model = built.model.eval()
    h, w = cfg.data.hw
    f = cfg.data.num_frames
    ctx = torch.randn(1, *text_shape, device=device)
    cond = Conditioning(
        cond={"encoder_hidden_states": ctx},
        no_text={"encoder_hidden_states": torch.zeros_like(ctx)},
        text_scale=7.5,
    )

    def model_fn(x, t, encoder_hidden_states, **kw):
        # sampling state in fp32; the model's inputs in its dtype, its output back to fp32
        return model(x.to(dtype), t, encoder_hidden_states.to(dtype), **kw).float()

    n = len(vae_kw["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **vae_kw,
    ).to(device, dtype)
    sched = dict(built.comps.scheduler_config)

    def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            lat = denoise(model_fn, (4, f, h, w), [0], sched, cond, steps=steps, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            video = decode_latents(vae, lat)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        assert torch.isfinite(video).all(), "sampled video is not finite"
        t2 = time.perf_counter()
        with torch.no_grad():
            encode_pixels(vae, video)  # what a pixel-path training step spends on its clip (latent shards: 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    once()  # warm-up: kernels chosen, memory pools grown
    denoise_s, decode_s, encode_s = once()
    from vldm.train.perf import peak_memory_gb

    return {
        "status": "ok",
        "steps": steps,
        "guidance_calls_per_step": 2,
        "denoise_s": denoise_s,
        "decode_s": decode_s,
        "s_per_video": denoise_s + decode_s,
        "vae_encode_s_per_clip": encode_s,
        "peak_mem_gb": peak_memory_gb(device),
        "frames": f,
        "pixels": [h * 2 ** (n - 1), w * 2 ** (n - 1)],
    }


def short(res: dict) -> str:
    keys = ("status", "step_s", "peak_mem_gb", "mfu", "data_wait", "s_per_video")
    return ", ".join(
        f"{k}={res[k]:.4g}" if isinstance(res.get(k), float) else f"{k}={res[k]}" for k in keys if k in res
    )


def table(report: dict) -> str:
    rows = [
        "| checkpointing | s/step | peak mem GB | TFLOP/s | MFU | data wait | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.get("train", []):
        if r.get("status") == "ok":
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (no peak for this device)"
            rows.append(
                f"| {r['level']} | {r['step_s']:.3f} | {r['peak_mem_gb']:.1f} | {r['tflops']:.1f} | {mfu} | "
                f"{r['data_wait']:.1%} | ok |"
            )
        else:
            rows.append(f"| {r['level']} | | | | | | {r.get('status')} |")
    s = report.get("sample", {})
    if s.get("status") == "ok":
        rows.append(
            f"\nsampling: {s['s_per_video']:.2f} s/video ({s['steps']} DDIM steps x 2 guidance calls: "
            f"{s['denoise_s']:.2f} s; VAE decode of {s['frames']} frames at {s['pixels'][0]}x{s['pixels'][1]}: "
            f"{s['decode_s']:.2f} s; peak {s['peak_mem_gb']:.1f} GB)"
        )
        ok = {r["level"]: r["step_s"] for r in report.get("train", []) if r.get("status") == "ok"}
        step = ok.get("temporal", next(iter(ok.values()), None))  # the recipe's level
        share = (
            f" = {s['vae_encode_s_per_clip'] / (s['vae_encode_s_per_clip'] + step):.0%} of a pixel-path step"
            if step
            else ""
        )
        rows.append(
            f"VAE encode of one clip (what latent shards remove from a step): {s['vae_encode_s_per_clip']:.3f} s{share}"
        )
    elif s:
        rows.append(f"\nsampling: {s.get('status')}")
    t = report.get("tests", {})
    rows.append(f"gpu tests: {t.get('status')} {t.get('summary', '')}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model and 4x8x8 latents (checks the script on CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per level (default 8; tiny 2)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed first steps per level (default 3; tiny 1)")
    ap.add_argument("--sample-steps", type=int, default=0, help="DDIM steps of the sampling part (default 25; tiny 2)")
    ap.add_argument(
        "--levels",
        default="off,temporal,block",
        help="checkpointing levels to time; LEVEL+fast adds train.compile + train.channels_last (GPU only; "
        "compiling takes a while: e.g. --levels off,temporal,block,temporal+fast when time allows)",
    )
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    ap.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for the gpu tests")
    ap.add_argument("--out", default="outputs/gpu_check.json", help="the JSON report")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device.replace("auto", "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        # explicit, not a version default: TF32 for the few fp32 matmuls (loss, fp32 master update)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    steps = a.steps or (2 if a.tiny else 8)
    warmup = a.warmup or (1 if a.tiny else 3)
    sample_steps = a.sample_steps or (2 if a.tiny else 25)
    report: dict = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "tiny" if a.tiny else "sd15",
        "env": environment(device),
        "skipped": [f"needs {m} (not installed here)" for m in NOT_USED if not have(m)],
    }
    print(f"gpu_check on {report['env']['device']} (torch {report['env']['torch']}), {report['mode']}", flush=True)
    out = Path(a.out)

    def save() -> None:
        report["total_s"] = time.perf_counter() - t_start
        from vldm.io import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=1, default=str))

    if a.skip_tests:
        report["tests"] = {"status": "skipped (--skip-tests)"}
    else:
        print("1. gpu tests", flush=True)
        report["tests"] = run_gpu_tests(a.tests_timeout)
        print(f"  {report['tests'].get('status')} {report['tests'].get('summary', '')}", flush=True)
    save()
    missing = [m for m in NEEDS if m != "pytest" and not have(m)]
    if missing:
        report["train"] = report["sample"] = {"status": f"skipped: {', '.join(missing)} not installed"}
        save()
        print(table(report))
        return 1
    frames, h, w = (4, 8, 8) if a.tiny else (16, 40, 64)
    cfg = model_config(a.tiny, frames, h, w)
    text_shape = (4, cfg.model.unet.cross_attention_dim) if a.tiny else (77, 768)
    print(f"2. temporal training step, {frames}x{h}x{w} latents, {str(dtype).split('.')[-1]}", flush=True)
    report["train"], built = train_levels(cfg, device, dtype, a.levels.split(","), steps, warmup, text_shape)
    save()
    print("3. sampling", flush=True)
    try:
        report["sample"] = sample_video(
            built, cfg, device, dtype, sample_steps, TINY_VAE if a.tiny else SD15_VAE, text_shape
        )
    except Exception as e:  # noqa: BLE001 - the training figures are already saved
        report["sample"] = {"status": f"error: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    print(f"  {short(report['sample'])}", flush=True)
    save()
    print("\n" + table(report))
    print(f"\nreport: {out} ({report['total_s']:.0f} s)")
    ok = all(r.get("status") == "ok" for r in report["train"]) and report["sample"].get("status") == "ok"
    return 0 if ok and report["tests"].get("status", "").startswith(("ok", "skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())

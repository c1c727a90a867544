"""Training step (forward + backward of the temporal layers) of VideoLDMUNet vs diffusers' video UNets.

Baselines, built at the same spatial configuration in the same process:
- diffusers `UNetSpatioTemporalConditionModel` (SVD: the same temporal design: 3D-conv res blocks,
  temporal transformers with cross-attention, learned merge);
- diffusers `UNetMotionModel` (AnimateDiff: temporal attention only).
Each trains only its temporal parameters, each with its best activation-checkpointing setting
(checkpointing trades time for memory: "off" is fastest for all three at this size; both settings are
printed). Prints time per clip and its ratio vs SVD (all timed in this process), the peak memory of a
training step (RSS high-water mark of a fresh child process per model and setting, minus its RSS once
the model is built: allocator caches make in-process RSS useless for this), and the temporal parameter
counts of the three designs at the SD-1.5 shape.

    python bench/bench_unet.py [--frames 8 --size 32 --batch 1 --iters 3 --channels 64,128,256,256]

Per-head overhead (issue 16 item 8): `--heads 8` (the default: 8 heads per level, head dim 8-32 at these
channels) against SVD's head layout, `--heads 2,4,8,8` (head dim 32 everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel

from vldm.models import VideoLDMUNet, count_parameters

NAMES = ("vldm VideoLDMUNet", "diffusers SVD UNet", "diffusers UNetMotionModel")


def is_temporal_svd(name: str) -> bool:
    return "temporal" in name or "time_mixer" in name or "time_pos_embed" in name


def build_models(
    ch: tuple[int, ...], heads: int | tuple[int, ...], ctx_dim: int, frames: int, which: tuple[str, ...]
) -> dict:
    n = len(ch)
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        block_out_channels=ch,
        layers_per_block=2,
        cross_attention_dim=ctx_dim,
        attention_head_dim=heads,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        norm_num_groups=32,
    )
    out = {}
    if NAMES[0] in which:
        out[NAMES[0]] = VideoLDMUNet.from_unet2d(unet2d)
    if NAMES[1] in which:
        svd = UNetSpatioTemporalConditionModel(
            in_channels=4,
            out_channels=4,
            block_out_channels=ch,
            layers_per_block=2,
            cross_attention_dim=ctx_dim,
            num_attention_heads=heads,
            num_frames=frames,
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=96,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (n - 1) + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (n - 1),
        )
        for name, p in svd.named_parameters():
            p.requires_grad_(is_temporal_svd(name))
        out[NAMES[1]] = svd
    if NAMES[2] in which:
        adapter = MotionAdapter(
            block_out_channels=ch,
            motion_layers_per_block=2,
            motion_mid_block_layers_per_block=1,
            motion_num_attention_heads=heads,
            motion_norm_num_groups=32,
            motion_max_seq_length=32,
            use_motion_mid_block=True,
        )
        motion = UNetMotionModel.from_unet2d(unet2d, adapter)
        motion.freeze_unet2d_params()
        out[NAMES[2]] = motion
    return out


def step_fns(models: dict, b: int, f: int, s: int, ctx_dim: int, seq: int):
    ours, svd, motion = (models.get(n) for n in NAMES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, f, s, s, generator=g)
    ctx = torch.randn(b, seq, ctx_dim, generator=g)
    t = torch.tensor([500] * b)

    def run_ours():
        ours(x, t, ctx).square().mean().backward()

    def run_svd():
        # SVD takes (b, f, c, h, w) and three micro-conditioning scalars
        svd(x.transpose(1, 2), t, ctx, added_time_ids=torch.zeros(b, 3)).sample.square().mean().backward()

    def run_motion():
        # AnimateDiff expects the text repeated per frame and (b, c, f, h, w) samples
        motion(x, t, ctx.repeat_interleave(f, 0)).sample.square().mean().backward()

    fns = dict(zip(NAMES, (run_ours, run_svd, run_motion)))
    return {n: fns[n] for n in models}


def set_ckpt(name: str, model, on: bool) -> None:
    if name.startswith("vldm"):
        model.set_gradient_checkpointing("block" if on else "off")
    elif on:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def time_it(fn, model, iters: int) -> float:
    model.train()
    fn()  # warm-up: allocator, oneDNN kernels
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / iters


def child_peak(args, name: str, ckpt: bool) -> float:
    """Peak MiB above the built model's RSS for one training step, in a fresh process."""
    cmd = [sys.executable, __file__, "--child", name, "--child-ckpt", str(int(ckpt))] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "child_ckpt", "iters")
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mib"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def parse_heads(spec: str) -> int | tuple[int, ...]:
    heads = tuple(int(h) for h in spec.split(","))
    return heads[0] if len(heads) == 1 else heads


def run_child(args, ch) -> None:
    models = build_models(ch, parse_heads(args.heads), args.ctx_dim, args.frames, (args.child,))
    model = models[args.child]
    set_ckpt(args.child, model, bool(args.child_ckpt))
    fn = step_fns(models, args.batch, args.frames, args.size, args.ctx_dim, args.ctx_len)[args.child]
    model.train()
    import gc

    gc.collect()
    # reset the kernel's RSS high-water mark (VmHWM) so the build's transients do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS") / 1024
    fn()
    peak = _status_kib("VmHWM") / 1024
    print(json.dumps({"peak_mib": max(0.0, peak - base)}))


def sd15_counts() -> dict[str, int]:
    with torch.device("meta"):
        sd = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        ours = count_parameters(VideoLDMUNet.from_unet2d(sd).temporal)
        svd = UNetSpatioTemporalConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            num_attention_heads=(5, 10, 20, 20),
            in_channels=4,
        )
        svd_n = sum(p.numel() for n, p in svd.named_parameters() if is_temporal_svd(n))
        ad = count_parameters(
            MotionAdapter(
                block_out_channels=(320, 640, 1280, 1280),
                motion_layers_per_block=2,
                motion_mid_block_layers_per_block=1,
                motion_num_attention_heads=8,
                motion_norm_num_groups=32,
                motion_max_seq_length=32,
                use_motion_mid_block=True,
            )
        )
    return {"vldm VideoLDMUNet": ours, "diffusers SVD UNet": svd_n, "diffusers UNetMotionModel": ad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--channels", default="64,128,256,256")
    ap.add_argument("--heads", default="8", help="attention heads: one for every level, or one per level (2,4,8,8)")
    ap.add_argument("--ctx-dim", type=int, default=256)
    ap.add_argument("--ctx-len", type=int, default=77)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ch = tuple(int(c) for c in args.channels.split(","))
    if len(args.heads.split(",")) not in (1, len(ch)):
        ap.error(f"--heads: one value or one per level ({len(ch)}), got {args.heads}")
    if args.child:
        return run_child(args, ch)
    models = build_models(ch, parse_heads(args.heads), args.ctx_dim, args.frames, NAMES)
    fns = step_fns(models, args.batch, args.frames, args.size, args.ctx_dim, args.ctx_len)
    print(
        f"train step (fwd+bwd, temporal params only), channels {ch}, {args.frames} frames, {args.size}x{args.size} "
        "latents, "
        f"batch {args.batch}, text {args.ctx_len}x{args.ctx_dim}, heads {args.heads}, "
        f"{torch.get_num_threads()} threads, {args.iters} iters"
    )
    results = {}
    for name, fn in fns.items():
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        for ckpt in (False, True):
            set_ckpt(name, models[name], ckpt)
            dt = time_it(fn, models[name], args.iters)
            mem = child_peak(args, name, ckpt)
            results[(name, ckpt)] = (dt, mem)
            print(
                f"  {name:28s} ckpt={'on ' if ckpt else 'off'}  {dt / args.batch * 1000:8.1f} ms/clip  "
                f"step peak +{mem:7.1f} MiB  trainable {trainable / 1e6:.2f}M"
            )
    print("best setting each (fastest):")
    best = {n: min(((results[(n, c)], c) for c in (False, True)), key=lambda r: r[0][0]) for n in fns}
    base_dt, base_mem = best["diffusers SVD UNet"][0]
    for name, ((dt, mem), c) in best.items():
        print(
            f"  {name:28s} ckpt={'on ' if c else 'off'} throughput x{base_dt / dt:5.2f} vs SVD UNet, "
            f"step peak memory x{mem / max(base_mem, 1e-9):5.2f} vs SVD UNet"
        )
    print("temporal parameters at the SD-1.5 shape (meta device):")
    for name, n in sd15_counts().items():
        print(f"  {name:28s} {n:,}")


if __name__ == "__main__":
    main()

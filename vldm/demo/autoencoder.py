"""Train the demo's tiny autoencoder: a real diffusers `AutoencoderKL`, saved with `save_pretrained`.

Stable Diffusion's autoencoder is trained on natural images with L1 + LPIPS + a patch GAN; the demo's
domain (solid shapes on a plain background) needs only L1 reconstruction plus a small KL term that
keeps the latent space smooth enough to diffuse in. The result replaces `BASE/vae/` so that every later
stage loads it through `vldm.models.base.load_components`, like a real SD VAE.

    python -m vldm.demo.autoencoder --shards SHARDS --out BASE/vae [--steps N]   # training shards only
    python -m vldm.demo.autoencoder --videos CORPUS_DIR --out BASE/vae             # or a directory of mp4s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from vldm.data.codec import decode_all


def load_frames(video_dir: str | Path, limit: int = 0) -> np.ndarray:
    """Every frame of every mp4 in `video_dir` (sorted, first `limit` videos) -> (N, H, W, 3) uint8."""
    paths = sorted(Path(video_dir).glob("*.mp4"))
    if limit:
        paths = paths[:limit]
    if not paths:
        raise FileNotFoundError(f"no .mp4 in {video_dir}")
    return np.concatenate([decode_all(str(p)) for p in paths])


def foreground_weight(x: torch.Tensor, weight: float, threshold: float = 0.25) -> torch.Tensor:
    """(b, 1, h, w) per-pixel loss weights, mean 1: pixels far from the frame's median colour (the
    shapes, ~8% of a frame) count `1 + weight` times. Plain L1 on mostly-background frames first learns
    the background: after 400 steps its reconstructions still had every shape beige; with weight 10
    the colours were right (measured on the demo corpus)."""
    bg = x.flatten(2).median(dim=2).values[..., None, None]
    w = 1 + weight * ((x - bg).abs().amax(1, keepdim=True) > threshold).float()
    return w / w.mean(dim=(2, 3), keepdim=True)


def load_shard_frames(shards: str, size: int = 32, holdout_shards: int = 1, num_frames: int = 8) -> np.ndarray:
    """Every frame of one epoch of the training split (the held-out shards are never seen) -> (N, H, W, 3) uint8,
    read through the training loader (vldm.data), so the autoencoder sees exactly what the LDM will."""
    from vldm.config.data import DataConfig
    from vldm.data import build_loader

    cfg = DataConfig(
        shards=shards,
        num_frames=num_frames,
        size=size,
        batch_size=16,
        shuffle_buffer=0,
        holdout_shards=holdout_shards,
        drop_last=False,
    )
    out = []
    for batch in build_loader(cfg, one_pass=True):  # one epoch (the training stream repeats forever)
        px = batch["pixels"]  # (B, C, F, H, W) in [-1, 1]
        out.append(
            ((px.permute(0, 2, 3, 4, 1).flatten(0, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        )
    return np.concatenate(out)


def build_vae(
    latent_channels: int = 4, channels: tuple[int, ...] = (32, 64, 64), norm_groups: int = 8
) -> AutoencoderKL:
    """Downsampling factor 2**(len(channels)-1): (32, 64, 64) turns 32x32 frames into 8x8 latents."""
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=norm_groups,
        sample_size=32,
        scaling_factor=1.0,
    )


def train_vae(
    frames: np.ndarray,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    fg_weight: float = 10.0,
    latent_channels: int = 4,
    channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
    log_every: int = 50,
) -> tuple[AutoencoderKL, dict]:
    """Train on random frames; return the model (scaling_factor set) and a small report.

    scaling_factor = 1 / std of the latent means, as SD does (0.18215 for its VAE): the diffusion model
    then sees unit-variance latents, which its noise schedule assumes.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae(latent_channels, channels).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay: the last steps at a small LR sharpen the edges
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.95 + 0.05
    )
    data = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)
    t0, l1_avg = time.time(), None
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(data), batch_size))
        x = data[idx].float() / 127.5 - 1
        if rng.random() < 0.5:  # flips: free augmentation, the domain is symmetric
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (foreground_weight(x, fg_weight) * (rec - x).abs()).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        l1_avg = l1.item() if l1_avg is None else 0.95 * l1_avg + 0.05 * l1.item()
        if log_every and step % log_every == 0:
            print(
                f"[autoencoder] step {step}/{steps} l1 {l1_avg:.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    vae.eval()
    with torch.no_grad():
        sample = data[torch.from_numpy(rng.integers(0, len(data), min(512, len(data))))].float() / 127.5 - 1
        lat = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        rec = torch.cat([vae.decode(lat[i : i + 64]).sample for i in range(0, len(lat), 64)])
        std = lat.std().item()
        psnr = (10 * torch.log10(4 / F.mse_loss(rec.clamp(-1, 1), sample))).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    report = {
        "steps": steps,
        "l1": l1_avg,
        "psnr_db": psnr,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "seconds": time.time() - t0,
        "frames": int(len(data)),
        "latent_shape": list(lat.shape[1:]),
    }
    return vae.requires_grad_(False), report


def save_vae(vae: AutoencoderKL, out_dir: str | Path, report: dict | None = None) -> Path:
    """save_pretrained into a temp dir beside `out_dir`, then swap it in: readers never see half a VAE."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp))
    if report is not None:
        (tmp / "train_report.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="vldm shards (data_prep/shard_videos.py output): frames of the training split")
    src.add_argument("--videos", help="or a directory of mp4s: all their frames")
    p.add_argument("--size", type=int, default=32, help="frame size read from --shards (default 32)")
    p.add_argument(
        "--holdout-shards", type=int, default=1, help="last shards never used (as data.holdout_shards) (default 1)"
    )
    p.add_argument("--out", required=True, help="output directory (e.g. BASE/vae)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per step (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate, cosine decay (default 2e-3)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-element KL term (default 1e-4)")
    p.add_argument("--fg-weight", type=float, default=10.0, help="extra L1 weight of shape pixels (default 10)")
    p.add_argument("--channels", default="32,64,64", help="block_out_channels; factor 2**(n-1) (default 32,64,64)")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4, as SD)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N videos (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    a = p.parse_args(argv)
    frames = load_shard_frames(a.shards, a.size, a.holdout_shards) if a.shards else load_frames(a.videos, a.limit)
    print(f"[autoencoder] {len(frames)} frames {frames.shape[1]}x{frames.shape[2]}", flush=True)
    vae, report = train_vae(
        frames,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        kl_weight=a.kl_weight,
        fg_weight=a.fg_weight,
        latent_channels=a.latent_channels,
        channels=tuple(int(c) for c in a.channels.split(",")),
        seed=a.seed,
    )
    save_vae(vae, a.out, report)
    print(
        f"[autoencoder] PSNR {report['psnr_db']:.1f} dB, latent {report['latent_shape']}, "
        f"scaling_factor {report['scaling_factor']:.3f}, {report['seconds']:.0f}s -> {a.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""Builders for eval tests: a tiny run dir with checkpoints, random feature networks with the real
input/output contracts, saved to files and loaded through the real loading code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vldm.checkpoint import COMPLETE, RUN_CONFIG, TEMPORAL_EMA_WEIGHTS, step_dir_name
from vldm.config import Config, build_config, dump_yaml

# the tiny run: 16x16 pixels, 4 frames, VAE factor 2 -> 8x8 latents
TINY_RUN = ["data.size=16", "data.num_frames=4", "model.unet.sample_size=8"]


def make_tiny_run(root: Path, steps=(100, 200), overrides=(), base: Path | None = None) -> Path:
    """RUN/config.yaml + RUN/checkpoints/step_N/ in the trainer's layout, weights perturbed per step."""
    from vldm.models.base import build_tiny_base, build_video_unet, load_components

    base = base or build_tiny_base(root / "base", vae_channels=(8, 8))
    run = root / "run"
    cfg = build_config(Config, [], [*TINY_RUN, f"model.pretrained={base}", f"run_dir={run}", *overrides])
    run.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run / RUN_CONFIG)
    model = build_video_unet(cfg.model, load_components(cfg.model))
    for i, step in enumerate(steps):
        add_checkpoint(run, model, step, seed=i)
    return run


def add_checkpoint(run: Path, model, step: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(1000 + seed)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in model.temporal_state_dict().items()}
    ema = {k: v * 0.5 for k, v in sd.items()}
    final = run / "checkpoints" / step_dir_name(step)
    tmp = run / "checkpoints" / f".tmp-{final.name}"
    model.save_temporal(tmp, sd)
    model.save_temporal(tmp / "ema", ema)
    (tmp / "ema" / "temporal.safetensors").rename(tmp / TEMPORAL_EMA_WEIGHTS)
    for f in (tmp / "ema").iterdir():
        f.unlink()
    (tmp / "ema").rmdir()
    (tmp / RUN_CONFIG).write_text((run / RUN_CONFIG).read_text())
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp / COMPLETE).write_text("")
    tmp.rename(final)
    return final


# ------------------------------------------------------------------ random feature networks
class TinyI3D(nn.Module):
    """I3D contract of `i3d_torchscript.pt`: (b, 3, t, 224, 224) in [-1, 1] -> 400 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, (3, 7, 7), stride=(2, 4, 4), padding=(1, 3, 3))
        self.conv2 = nn.Conv3d(8, 16, (3, 3, 3), stride=(2, 4, 4), padding=1)
        self.fc = nn.Linear(16, 400)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if x.shape[-1] != 224 or x.shape[-2] != 224:
            raise ValueError("I3D expects 224x224 input")
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        logits = self.fc(h.mean((2, 3, 4)))
        return logits if return_features else logits.softmax(-1)


class TinyInception(nn.Module):
    """NVlabs Inception contract: (b, 3, 299, 299) in [0, 255] -> 2048-d pool features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 9, stride=8)
        self.proj = nn.Linear(32, 2048)
        self.head = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.shape[-1] != 299 or img.shape[-2] != 299:
            raise ValueError("Inception expects 299x299 input")
        x = img.float() / 127.5 - 1
        feats = F.relu(self.proj(F.relu(self.conv(x)).mean((2, 3))))
        return feats if return_features else self.head(feats)


def save_torchscript(cls: type[nn.Module], path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(cls().eval()).save(str(path))
    return path


def save_tiny_clip(out: Path, image_size: int = 224) -> Path:
    """A real transformers CLIPModel directory (random, tiny) with a locally built tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from vldm.models.base import build_tiny_tokenizer

    build_tiny_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=32,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(out))
    return out


def write_real_videos(directory: Path, n: int, frames: int = 16, size: int = 24, seed: int = 0) -> Path:
    """n small mp4 clips of moving colour gradients."""
    from vldm.io import write_mp4

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        c = rng.uniform(0, 255, 3)
        v = rng.uniform(-2, 2, 2)
        clip = np.stack(
            [
                np.stack([(c[k] + 4 * (xx * (k + 1) + v[0] * t) + 3 * (yy + v[1] * t)) % 256 for k in range(3)], -1)
                for t in range(frames)
            ]
        ).astype(np.uint8)
        write_mp4(directory / f"real_{i:04d}.mp4", clip, fps=8)
    return directory

"""stage=decoder: fine-tune the video decoder on clips (paper §3.1.1). Entry point: `train_decoder(cfg)`.

    python -m vldm.train.decoder --config configs/decoder_tiny.yaml [key=value ...]

(or `python -m vldm.train` with `stage=decoder`, which dispatches here). Per step, on a clip x in [-1, 1]:
the frozen image encoder gives z (its mean, as the latent shards hold), the video decoder reconstructs
x_hat, and

    L_G = l1 |x - x_hat| + lpips LPIPS(x, x_hat) + lambda disc_weight hinge_G(D(x_hat))
    L_D = hinge_D(D(x), D(x_hat))       (3D patch discriminator, no image discriminator)

with lambda the adaptive weight |grad L_rec| / |grad L_adv| at the decoder's last layer (taming/SD
VAE training). Only `decoder.trainable` parameters change; the encoder and the latents never do.

The loop is a plain single-process torch loop (the decoder is small next to the UNet); it shares the
data sources, logger and LR schedule of the DeepSpeed trainer and the run-dir layout of
`vldm.checkpoint`: checkpoints/step_N/{video_decoder/, discriminator.safetensors, optimizer.pt,
trainer_state.json, config.yaml, COMPLETE}; `checkpoint.resume=auto` continues from the newest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from vldm.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    RUN_CONFIG,
    TRAINER_STATE,
    complete_checkpoints,
    latest_checkpoint,
    step_dir_name,
)
from vldm.config.core import atomic_write_text, build_config, dump_yaml, field_
from vldm.config.decoder import DecoderConfig
from vldm.config.schema import Config
from vldm.diffusion.sampler import encode_pixels
from vldm.models.base import load_components
from vldm.models.discriminator3d import PatchDiscriminator3D, hinge_d_loss, hinge_g_loss
from vldm.models.lpips import load_lpips
from vldm.models.temporal_decoder import DECODER_DIR, VideoDecoder

DISC_WEIGHTS = "discriminator.safetensors"
OPTIM_STATE = "optimizer.pt"
TMP_PREFIX = ".tmp-"


def run_config_class() -> type:
    """The run schema with a `decoder` section and stage=decoder: `Config` itself once it has them,
    else a subclass adding exactly those two fields."""
    hints = typing.get_type_hints(Config)
    if "decoder" in hints and "decoder" in typing.get_args(hints["stage"]):
        return Config

    @dataclasses.dataclass
    class DecoderRunConfig(Config):
        stage: Literal["image", "temporal", "decoder"] = field_("decoder", "image | temporal | decoder (video decoder fine-tuning, vldm.train.decoder)")
        decoder: DecoderConfig = field_(default_factory=DecoderConfig, help="video decoder fine-tuning (stage=decoder)")

    return DecoderRunConfig


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|grad rec| / |grad adv| at `last_layer` (Esser et al. 2021): balances the GAN term per step."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _lpips_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    f = x.shape[2]
    idx = torch.linspace(0, f - 1, min(n, f)).round().long().to(x.device)
    return x.index_select(2, idx).transpose(1, 2).flatten(0, 1)  # (b n) c h w


class DecoderTrainer:
    """State of one decoder fine-tuning run; `run()` trains to `train.max_steps`."""

    def __init__(self, cfg: Any, batches: Any = None, device: torch.device | str | None = None):
        self.cfg, self.dc = cfg, cfg.decoder
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)
        comps = load_components(cfg.model, load_vae=True, load_text=False)
        if comps.vae is None:
            raise ValueError("stage=decoder needs model.pretrained with a vae/ (an AutoencoderKL)")
        self.vae = comps.vae.to(self.device).eval().requires_grad_(False)
        self.vsf = comps.vae_scale_factor
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.model = VideoDecoder.from_vae(self.vae, kernel_size=self.dc.kernel_size).to(self.device)
        self.disc = PatchDiscriminator3D(3, self.dc.disc_channels, self.dc.disc_layers).to(self.device)
        self.model.requires_grad_(False)
        params = self.model.temporal_parameters() if self.dc.trainable == "temporal" else list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        self.params = params
        betas = (0.5, 0.9)  # taming / SD autoencoder GAN training
        self.opt_g = torch.optim.Adam(params, lr=cfg.optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.dc.disc_lr, betas=betas)
        self.lpips = load_lpips(self.dc.lpips_weights, self.dc.lpips_sha256, self.device) if self.dc.lpips_weight > 0 else None
        self.source = batches if batches is not None else self._source()
        from vldm.train.logger import build_logger

        self.logger = build_logger(cfg, is_main=True)
        self._resume()

    def _source(self):
        from vldm.train.sources import build_source

        size = self.cfg.data.size
        hw = (size // self.vsf, size // self.vsf)
        return build_source(self.cfg, 0, 1, self.vae.config.latent_channels, hw, self.vsf, has_vae=True)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        ck = None if mode == "never" else (latest_checkpoint(self.run_dir) if mode == "auto" else Path(mode))
        if ck is None:
            return
        self.model.load_state_dict(VideoDecoder.from_pretrained(str(ck / DECODER_DIR)).state_dict())
        self.disc.load_state_dict(load_file(str(ck / DISC_WEIGHTS)))
        opt = torch.load(ck / OPTIM_STATE, map_location=self.device, weights_only=True)
        self.opt_g.load_state_dict(opt["g"])
        self.opt_d.load_state_dict(opt["d"])
        state = json.loads((ck / TRAINER_STATE).read_text())
        self.step = int(state["step"])
        if state.get("loader") is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state["loader"])
        print(f"[decoder] resumed from {ck} at step {self.step}", flush=True)

    def save(self) -> Path:
        root = self.run_dir / CHECKPOINTS
        final = root / step_dir_name(self.step)
        tmp = root / f"{TMP_PREFIX}{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(str(tmp / DECODER_DIR))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()}, str(tmp / DISC_WEIGHTS))
        torch.save({"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict()}, tmp / OPTIM_STATE)
        dump_yaml(self.cfg, tmp / RUN_CONFIG)
        loader = self.source.state_dict() if hasattr(self.source, "state_dict") else None
        atomic_write_text(tmp / TRAINER_STATE, json.dumps({"step": self.step, "loader": loader, "saved_at": time.time()}))
        atomic_write_text(tmp / COMPLETE, f"step {self.step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ one step
    def train_step(self, pixels: torch.Tensor) -> dict[str, float]:
        dc = self.dc
        x = pixels.to(self.device, torch.float32)
        with torch.no_grad():
            z = encode_pixels(self.vae, x)  # frozen encoder: the image LDM's latents are unchanged
        self.model.train()
        rec = self.model(z)
        l1 = (rec - x).abs().mean()
        rec_loss = dc.l1_weight * l1
        logs = {"train/l1": l1.item()}
        if self.lpips is not None:
            lp = self.lpips(_lpips_frames(rec, dc.lpips_frames), _lpips_frames(x, dc.lpips_frames)).mean()
            rec_loss = rec_loss + dc.lpips_weight * lp
            logs["train/lpips"] = lp.item()
        loss = rec_loss
        use_gan = dc.disc_weight > 0 and self.step >= dc.disc_start
        if use_gan:
            g_loss = hinge_g_loss(self.disc(rec))
            lam = adaptive_weight(rec_loss, g_loss, self.model.time_conv_out.weight) if dc.adaptive_weight else torch.tensor(1.0)
            loss = rec_loss + dc.disc_weight * lam * g_loss
            logs.update({"train/g_loss": g_loss.item(), "train/adaptive_weight": lam.item()})
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt_g.step()
        if use_gan:
            self.opt_d.zero_grad(set_to_none=True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach()))
            d_loss.backward()
            self.opt_d.step()
            logs["train/d_loss"] = d_loss.item()
        logs["train/loss"] = loss.item()
        return logs

    def run(self) -> Path:
        from vldm.train.lr import lr_at

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, self.run_dir / RUN_CONFIG)
        last = None
        while self.step < cfg.train.max_steps:
            batch = next(self.source)
            if "pixels" not in batch:
                raise ValueError("stage=decoder trains on pixels: set data.use_latents=false")
            lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
            for g in self.opt_g.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            logs = self.train_step(torch.as_tensor(batch["pixels"]))
            self.step += 1
            if not all(map(lambda v: v == v and abs(v) != float("inf"), logs.values())):
                raise FloatingPointError(f"non-finite decoder loss at step {self.step}: {logs}")
            if self.step % cfg.train.log_every == 0:
                self.logger.log({**logs, "train/lr": lr, "perf/step_s": time.perf_counter() - t0}, self.step)
                print(f"[decoder] step {self.step} " + " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in logs.items()), flush=True)
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                last = self.save()
        self.logger.finish(0)
        return last or latest_checkpoint(self.run_dir)


def train_decoder(cfg: Any, batches: Any = None) -> Path:
    """Fine-tune the video decoder of `cfg.model.pretrained`'s VAE; returns the last checkpoint directory.

    `cfg` is the run config with a `decoder` section (`run_config_class()`); `batches` optionally
    replaces the data source (an iterator of {"pixels": (b, 3, f, H, W)} dicts).
    """
    return DecoderTrainer(cfg, batches).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vldm.train.decoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[], help="YAML config (repeatable; later files override)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    a = ap.parse_args(argv)
    cfg = build_config(run_config_class(), a.config, a.overrides)
    print(f"[decoder] last checkpoint: {train_decoder(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

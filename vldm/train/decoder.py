"""stage=decoder: fine-tune the video decoder on clips (paper §3.1.1). Entry points: `run_decoder(cfg)`
(a whole training process, what `python -m vldm.train` runs for stage=decoder) and `train_decoder(cfg)`.

    bash slurm/train_temporal.sbatch configs/decoder_tiny.yaml model.pretrained=PATH   # 2 CPU ranks / all GPUs
    sbatch slurm/train_temporal.sbatch configs/decoder_tiny.yaml model.pretrained=PATH # SLURM, one rank per GPU
    python -m vldm.train --config configs/decoder_tiny.yaml model.pretrained=PATH      # one process

Per step, on a clip x in [-1, 1]: the frozen image encoder gives z (its mean, as the latent shards
hold), the video decoder reconstructs x_hat, and

    L_G = l1 |x - x_hat| + lpips LPIPS(x, x_hat) + lambda disc_weight hinge_G(D(x_hat))
    L_D = hinge_D(D(x), D(x_hat))       (3D patch discriminator, no image discriminator)

with lambda the adaptive weight |grad L_rec| / |grad L_adv| at the decoder's last layer (taming/SD
VAE training). Only `decoder.trainable` parameters change; the encoder and the latents never do.

Data parallel over ranks (torch DDP over gloo or NCCL; the ranks come from the launcher's environment
through `vldm.train.dist`, as for the DeepSpeed trainer): the generator's trainable part and the
discriminator are each wrapped in DDP with their own Adam, each rank draws its own share of the data
from the same loader (split by rank), and the adaptive weight uses the all-reduced gradients at the
last layer, so N ranks x B clips train exactly as 1 rank x N*B clips. DeepSpeed is not used here: its
engine owns one optimizer, a GAN has two, and the decoder's trainable part is small enough that
replicated Adam states cost nothing. One all-reduce per step carries the logged losses, a non-finite
flag and the stop flag (USR1/TERM/INT, train.stop_after_*), so every rank stops at the same step; rank
0 saves checkpoints/step_N/{video_decoder/, discriminator.safetensors, optimizer.pt,
trainer_state.json, config.yaml, COMPLETE} (the Adam states are identical on every rank; the loader
positions of all ranks are gathered) and writes logs/last_exit.json; `checkpoint.resume=auto`
continues from the newest complete checkpoint, at any world size.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from vldm.checkpoint import (
    CHECKPOINTS,
    RUN_CONFIG,
    TRAINER_STATE,
    latest_checkpoint,
    step_dir_name,
)
from vldm.config.core import dump_yaml
from vldm.config.schema import Config
from vldm.diffusion.sampler import encode_pixels
from vldm.io import atomic_write_text
from vldm.models.base import load_components
from vldm.models.discriminator3d import PatchDiscriminator3D, hinge_d_loss, hinge_g_loss
from vldm.models.lpips import load_lpips
from vldm.models.temporal_decoder import DECODER_DIR, VideoDecoder
from vldm.train import dist
from vldm.train.checkpointing import (
    _from_jsonable,
    _jsonable,
    clean_partial_checkpoints,
    fresh_checkpoint_dirs,
    publish_checkpoint,
)
from vldm.train.signals import REQUEUE_EXIT, StopRequest, process_exit_code, write_exit_status

DISC_WEIGHTS = "discriminator.safetensors"
OPTIM_STATE = "optimizer.pt"


def adaptive_weight(
    rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, world_size: int = 1
) -> torch.Tensor:
    """|grad rec| / |grad adv| at `last_layer` (Esser et al. 2021): balances the GAN term per step.

    Over several ranks the gradients are averaged first (what DDP does to the parameter gradients), so
    the weight is that of the global batch, the same on every rank and at every world size."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    if world_size > 1:
        both = dist.all_reduce(torch.stack([g_rec, g_adv])) / world_size
        g_rec, g_adv = both[0], both[1]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _lpips_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    f = x.shape[2]
    idx = torch.linspace(0, f - 1, min(n, f)).round().long().to(x.device)
    return x.index_select(2, idx).transpose(1, 2).flatten(0, 1)  # (b n) c h w


# the logged values, in the order of the per-step all-reduce (absent ones are 0 on every rank)
LOG_KEYS = ("train/loss", "train/l1", "train/lpips", "train/g_loss", "train/adaptive_weight", "train/d_loss")


class DecoderTrainer:
    """State of one decoder fine-tuning run on this rank; `run()` trains to `train.max_steps`.

    `world` defaults to the launcher's environment (`dist.detect_world()`); with more than one rank the
    process group is initialised here (unless the caller did) and the models are wrapped in DDP.
    `stop` is the shared stop flag (`run_decoder` installs the signal handlers; by default none are);
    `watchdog`, when given, is re-armed at every step (a rank stuck in a collective ends the job).
    """

    def __init__(
        self,
        cfg: Any,
        batches: Any = None,
        device: torch.device | str | None = None,
        world: dist.World | None = None,
        stop: StopRequest | None = None,
        watchdog: dist.Watchdog | None = None,
    ):
        self.cfg, self.dc = cfg, cfg.decoder
        self.watchdog = watchdog
        self.world = world or dist.detect_world()
        self.device = torch.device(device) if device is not None else dist.device_for(self.world)
        self.stop = stop or StopRequest(cfg.train.stop_after_steps, cfg.train.stop_after_minutes, install=False)
        dist.init_torch_process_group(self.world, self.device, cfg.deepspeed.timeout_s)
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
        comps = load_components(cfg.model, load_vae=True, load_text=False)
        if comps.vae is None:
            raise ValueError("stage=decoder needs model.pretrained with a vae/ (an AutoencoderKL)")
        self.vae = comps.vae.to(self.device).eval().requires_grad_(False)
        self.vsf = comps.vae_scale_factor
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.exit_code = 0
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
        ws = self.world.world_size
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP averages the gradients of the trainable parameters only (frozen ones get no hooks)
        self.g = DistributedDataParallel(self.model, device_ids=ids) if ws > 1 else self.model
        self.d = DistributedDataParallel(self.disc, device_ids=ids) if ws > 1 else self.disc
        self.lpips = (
            load_lpips(self.dc.lpips_weights, self.dc.lpips_sha256, self.device) if self.dc.lpips_weight > 0 else None
        )
        self.source = batches if batches is not None else self._source()
        from vldm.train.logger import build_logger

        self.logger = build_logger(cfg, is_main=self.world.is_main)
        self._resume()

    def _source(self):
        from vldm.train.sources import build_source

        size = self.cfg.data.size
        hw = (size // self.vsf, size // self.vsf)
        return build_source(
            self.cfg,
            self.world.rank,
            self.world.world_size,
            self.vae.config.latent_channels,
            hw,
            self.vsf,
            has_vae=True,
        )

    def log0(self, msg: str) -> None:
        dist.print0(f"[decoder {time.strftime('%H:%M:%S')}] {msg}", world=self.world)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        ck = None if mode == "never" else (latest_checkpoint(self.run_dir) if mode == "auto" else Path(mode))
        if ck is None:
            return
        # every rank reads the same files: the DDP replicas (and their Adam states) are identical
        self.model.load_state_dict(VideoDecoder.from_pretrained(str(ck / DECODER_DIR)).state_dict())
        self.disc.load_state_dict(load_file(str(ck / DISC_WEIGHTS)))
        opt = torch.load(ck / OPTIM_STATE, map_location=self.device, weights_only=True)
        self.opt_g.load_state_dict(opt["g"])
        self.opt_d.load_state_dict(opt["d"])
        state = json.loads((ck / TRAINER_STATE).read_text())
        self.step = int(state["step"])
        loaders = state.get("loader")
        if isinstance(loaders, dict):  # a checkpoint of the former single-process loop: one loader state
            loaders = [loaders]
        if loaders and loaders[0] is not None and hasattr(self.source, "load_state_dict"):
            same_world = len(loaders) == self.world.world_size
            # at another world size the synthetic source carries its position over exactly; the shard
            # loader logs the layout change and starts a fresh epoch order (as in the DeepSpeed trainer)
            self.source.load_state_dict(_from_jsonable(loaders[self.world.rank] if same_world else loaders[0]))
        self.log0(
            f"resumed from {ck} at step {self.step} (saved at world size {len(loaders or [None])}, "
            f"now {self.world.world_size})"
        )

    def save(self) -> Path:
        """Every rank calls this (the loader positions are gathered); rank 0 writes."""
        loaders = dist.all_gather_object(
            _jsonable(self.source.state_dict()) if hasattr(self.source, "state_dict") else None
        )
        final = self.run_dir / CHECKPOINTS / step_dir_name(self.step)
        if self.world.is_main:
            tmp, final = fresh_checkpoint_dirs(self.run_dir, self.step)
            self.model.save_pretrained(str(tmp / DECODER_DIR))
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()}, str(tmp / DISC_WEIGHTS)
            )
            torch.save({"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict()}, tmp / OPTIM_STATE)
            dump_yaml(self.cfg, tmp / RUN_CONFIG)
            state = {
                "step": self.step,
                "stage": "decoder",
                "world_size": self.world.world_size,
                "loader": loaders,
                "saved_at": time.time(),
            }
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state))
            publish_checkpoint(tmp, final, self.step, self.cfg.checkpoint.keep_last)
        dist.barrier()  # nobody reads the checkpoint or exits before it is complete
        return final

    # ------------------------------------------------------------------ one step
    def train_step(self, pixels: torch.Tensor) -> dict[str, float]:
        """One generator and one discriminator update on this rank's clips; returns this rank's losses."""
        dc = self.dc
        x = pixels.to(self.device, torch.float32)
        if pixels.dtype == torch.uint8:  # data.pixel_dtype=uint8
            x = x / 127.5 - 1.0
        x = x.contiguous()  # torch 2.13 CPU: backward through channels-last-strided inputs segfaults
        with torch.no_grad():
            z = encode_pixels(self.vae, x)  # frozen encoder: the image LDM's latents are unchanged
        self.model.train()
        rec = self.g(z)
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
            # the generator's view of D: no parameter gradients for D (under DDP they would also fire D's
            # reducer outside D's own step), only the gradient through D to the reconstruction
            self.disc.requires_grad_(False)
            g_loss = hinge_g_loss(self.disc(rec))
            self.disc.requires_grad_(True)
            lam = (
                adaptive_weight(rec_loss, g_loss, self.model.time_conv_out.weight, self.world.world_size)
                if dc.adaptive_weight
                else torch.tensor(1.0)
            )
            loss = rec_loss + dc.disc_weight * lam * g_loss
            logs.update({"train/g_loss": g_loss.item(), "train/adaptive_weight": lam.item()})
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the trainable parameters' gradients over the ranks here
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt_g.step()
        if use_gan:
            self.opt_d.zero_grad(set_to_none=True)
            # real and fake in one forward: one DDP reduction (the GroupNorm discriminator is per-sample)
            real, fake = self.d(torch.cat([x, rec.detach()])).split(x.shape[0])
            d_loss = hinge_d_loss(real, fake)
            d_loss.backward()
            self.opt_d.step()
            logs["train/d_loss"] = d_loss.item()
        logs["train/loss"] = loss.item()
        return logs

    def run(self) -> Path | None:
        """Train to `train.max_steps` or until a stop is agreed (`exit_code` 0 or REQUEUE_EXIT); returns
        the last checkpoint."""
        from vldm.train.lr import lr_at

        cfg, world = self.cfg, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_partial_checkpoints(self.run_dir)  # a save cut short by a kill
            dump_yaml(cfg, self.run_dir / RUN_CONFIG)
        last = None
        last_saved, steps_this_job = self.step, 0
        # iter() after _resume: the shard loader is an iterable (restored by load_state_dict before it starts),
        # the synthetic source and a `batches` argument are iterators already (iter returns them)
        data = iter(self.source)
        while self.step < cfg.train.max_steps:
            if self.watchdog is not None:
                self.watchdog.arm(cfg.deepspeed.timeout_s * 2)  # a step and a save after it must end in time
            batch = next(data)
            if "pixels" not in batch:
                raise ValueError("stage=decoder trains on pixels: set data.use_latents=false")
            lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
            for grp in self.opt_g.param_groups:
                grp["lr"] = lr
            t0 = time.perf_counter()
            pixels = torch.as_tensor(batch["pixels"])
            logs = self.train_step(pixels)
            self.step += 1
            steps_this_job += 1
            local = [logs.get(k, 0.0) for k in LOG_KEYS]
            finite = all(v == v and abs(v) != float("inf") for v in local)
            # one collective per step: the ranks' losses (summed), non-finite ranks, ranks asking to stop
            agreed = dist.all_reduce(
                torch.tensor(
                    [*(v if finite else 0.0 for v in local), float(not finite), float(self.stop.local(steps_this_job))],
                    dtype=torch.float64,
                )
            )
            if agreed[-2] > 0:
                raise FloatingPointError(
                    f"non-finite decoder loss at step {self.step} on {int(agreed[-2])} rank(s); "
                    f"this rank: {logs}. Lower optim.lr or decoder.disc_lr, or check the data."
                )
            step_s = time.perf_counter() - t0
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                mean = {k: agreed[i].item() / world.world_size for i, k in enumerate(LOG_KEYS) if k in logs}
                self.logger.log(
                    {
                        **mean,
                        "train/lr": lr,
                        "perf/step_time_s": step_s,
                        "perf/clips_per_s": pixels.shape[0] * world.world_size / step_s,
                    },
                    self.step,
                )
                self.log0(
                    f"step {self.step}/{cfg.train.max_steps} "
                    + " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in mean.items())
                    + f" {step_s:.3f} s/step"
                )
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                last, last_saved = self.save(), self.step
            if agreed[-1] > 0 and self.step < cfg.train.max_steps:
                if last_saved != self.step:
                    last = self.save()
                self.log0(
                    f"stopped at step {self.step} ({self.stop.reason(steps_this_job)}): exit {REQUEUE_EXIT}; "
                    "run the same command again to resume from this checkpoint"
                )
                self.exit_code = REQUEUE_EXIT
                self.logger.preempting()
                break
        self.logger.finish(0)
        return last or latest_checkpoint(self.run_dir)


def train_decoder(cfg: Any, batches: Any = None) -> Path | None:
    """Fine-tune the video decoder of `cfg.model.pretrained`'s VAE in this process (one rank alone, or
    this process's rank of a launcher's job); returns the last checkpoint directory.

    `batches` optionally replaces the data source (an iterator of {"pixels": (b, 3, f, H, W)} dicts).
    """
    return DecoderTrainer(cfg, batches).run()


def run_decoder(cfg: Config) -> int:
    """One rank of a stage=decoder job, as `vldm.train.trainer.train` is for the diffusion stages: signals
    set the stop flag, a watchdog bounds start-up, every step and every save, rank 0 writes
    logs/last_exit.json (the sbatch script requeues on a stop). Returns the process exit code."""
    world = dist.detect_world()
    stop = StopRequest(cfg.train.stop_after_steps, cfg.train.stop_after_minutes)
    watchdog = dist.Watchdog(cfg.deepspeed.timeout_s)
    dist.set_barrier_timeout(cfg.deepspeed.timeout_s)
    watchdog.arm(max(cfg.deepspeed.timeout_s, dist.STARTUP_BOUND_S))  # start-up: rendezvous and model loading
    try:
        trainer = DecoderTrainer(cfg, world=world, stop=stop, watchdog=watchdog)
        dist.print0(
            f"[decoder] rank {world.rank}/{world.world_size} via {world.launcher}, device {trainer.device}: "
            f"{sum(p.numel() for p in trainer.params) / 1e6:.3f}M trainable decoder parameters "
            f"(decoder.trainable={cfg.decoder.trainable}), "
            f"{sum(p.numel() for p in trainer.disc.parameters()) / 1e6:.3f}M discriminator parameters",
            world=world,
        )
        t0 = time.perf_counter()
        trainer.run()
        code = trainer.exit_code
        if code == 0:
            trainer.log0(f"done: {trainer.step} steps, {time.perf_counter() - t0:.1f} s in this job")
        if world.is_main:
            write_exit_status(cfg.run_dir, code, trainer.step, cfg.train.max_steps, stage="decoder")
        dist.barrier()  # nobody exits before rank 0 has written the status
        watchdog.disarm()
        stop.restore()
        dist.shutdown()
        return process_exit_code(code, world.launcher)
    except Exception:
        # no collective after an error: a peer may be gone. Print, and let the launcher end the job.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)

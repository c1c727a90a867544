"""Helpers of the tests of the paper's other models (tests/test_paper_*.py, tests/test_sample_*.py)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from vldm.diffusion import diffusion_loss, make_scheduler
from vldm.models.base import SD_SCHEDULER
from vldm.tasks.base import TaskInputs


def task_loss(
    model, inputs: TaskInputs, latents: torch.Tensor, ctx: torch.Tensor, scheduler, generator
) -> torch.Tensor:
    """The trainer's objective for a task (vldm.train.objective): target, extra channels, kwargs, loss mask."""
    target = inputs.target_latents if inputs.target_latents is not None else latents

    def model_fn(noisy, t):
        x = noisy if inputs.extra_channels is None else torch.cat([noisy, inputs.extra_channels], 1)
        return model(x, t, ctx, **inputs.model_kwargs)

    if inputs.loss_mask is None:
        return diffusion_loss(model_fn, target, scheduler, generator)
    noise = torch.randn(target.shape, generator=generator)
    t = torch.randint(0, 1000, (target.shape[0],), generator=generator)
    m = inputs.loss_mask.expand(-1, 1, -1, 1, 1)

    def masked_fn(noisy, tt):
        return model_fn(noisy, tt) * m + noise * (1 - m)  # eps target: masked frames have zero error

    per = diffusion_loss(masked_fn, target, scheduler, timesteps=t, noise=noise, reduce=False)
    return (per / m.flatten(1).mean(1).clamp(min=1e-8)).mean()


def train_a_few_steps(model, task, latents: torch.Tensor, batch: dict, steps: int = 3, lr: float = 1e-3) -> list[float]:
    """A small local loop with the task + diffusion_loss; only the temporal parameters are optimised."""
    sched = make_scheduler(dict(SD_SCHEDULER), "ddpm")
    params = model.temporal_parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    ctx = torch.zeros(latents.shape[0], 1, model.unet.config.cross_attention_dim)
    model.train()
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        inputs = task.training_inputs(latents, batch, g)
        loss = task_loss(model, inputs, latents, ctx, sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def tiny_unet(**kw) -> UNet2DConditionModel:
    from vldm.config.model import UNetSpec

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNetSpec(**kw).diffusers_kwargs()).eval().requires_grad_(False)


def write_run(run_dir, base, stage, num_frames: int = 8, size: int = 16):
    """A training run directory with one complete checkpoint of `stage` (a StageModel on `base`'s UNet),
    in the trainer's layout (vldm.checkpoint): what `python -m vldm.sample --run` reads."""
    import dataclasses
    from pathlib import Path

    from vldm.checkpoint import COMPLETE, RUN_CONFIG, TEMPORAL_EMA_WEIGHTS, step_dir_name
    from vldm.config.core import dump_yaml, from_dict, to_dict
    from vldm.config.model import TemporalOptions
    from vldm.config.schema import Config

    ck = Path(run_dir) / "checkpoints" / step_dir_name(1)
    stage.model.save_temporal(ck)
    stage.model.save_temporal(ck.parent / ".ema")
    (ck.parent / ".ema" / "temporal.safetensors").replace(ck / TEMPORAL_EMA_WEIGHTS)
    cfg = Config(task=stage.task, task_options=dict(stage.task_options), run_dir=str(run_dir))
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, pretrained=str(base), temporal=from_dict(TemporalOptions, to_dict(stage.model.opts))
        ),
        data=dataclasses.replace(cfg.data, num_frames=num_frames, size=size),
    )
    dump_yaml(cfg, ck / RUN_CONFIG)
    (ck / COMPLETE).write_text("step 1\n")
    return Path(run_dir)

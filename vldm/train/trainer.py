"""The training loop. Everything else (model, engine, data, objective, checkpoints, logging, signals)
lives in its own module; this file reads top to bottom.

Per optimizer step: set the LR for this step; for each micro-step draw a batch (timed: data wait),
compute the loss and `engine.backward` / `engine.step` (DeepSpeed reduces gradients and steps the
optimizer at the accumulation boundary, and skips the update when the gradient norm is not finite);
then ONE all-reduce carries the step's loss, a non-finite flag and the stop flag, so every rank logs
the same loss and every rank agrees whether to stop at this step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
import warnings
from pathlib import Path

import torch

from vldm.checkpoint import RUN_CONFIG
from vldm.config.core import dump_yaml
from vldm.config.schema import Config
from vldm.train import dist
from vldm.train.build import apply_device_options, build, count
from vldm.train.checkpointing import Checkpointer, dir_bytes, plan_resume, restore
from vldm.train.ema import EMA
from vldm.train.engine import GradNormSkip, grad_norm, parallelize, resolve_backend, resolve_precision, set_lr
from vldm.train.logger import build_logger
from vldm.train.lr import lr_at
from vldm.train.objective import Objective
from vldm.train.perf import peak_memory_gb, peak_tflops, train_flops
from vldm.train.prefetch import DevicePrefetcher
from vldm.train.signals import ABORT_EXIT, REQUEUE_EXIT, StopRequest, process_exit_code, write_exit_status
from vldm.train.sources import (
    SyntheticClips,
    bucket_geometries,
    build_source,
    clip_geometry,
    data_metrics,
    seed_of,
)


@dataclasses.dataclass
class TrainState:
    """Counters that survive a restart (saved in trainer_state.json)."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient, or a norm spike)
    grad_spike_steps: int = 0  # of those, skipped for a finite gradient norm above optim.skip_grad_norm
    bad_streak: int = 0  # consecutive skipped steps
    clips_seen: int = 0  # clips (images in stage=image) consumed by all ranks
    elapsed_s: float = 0.0  # training wall time over all jobs
    rewarmup_from: int = -1  # optim.rewarmup_steps: the step of the last resume at another world size


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`: a finite loss whose gradient norm
    spikes, past what the precision holds with inf (train.debug_inject_grad_spike_steps) or finite
    (train.debug_inject_finite_spike_steps). A rehearsal aid."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def latent_geometry(cfg: Config, built) -> tuple[int, tuple[int, int], int]:
    """(latent channels, latent (h, w), VAE factor) for data.size x data.width pixels (the shape of a flat
    layout; with aspect/length buckets every batch has its bucket's shape: sources.clip_geometry)."""
    comps = built.comps
    scale = comps.vae_scale_factor
    vae_cfg = Path(cfg.model.pretrained) / "vae" / "config.json" if cfg.model.pretrained else None
    if comps.vae is None and vae_cfg is not None and vae_cfg.exists():
        # latents in the shards: the VAE is not loaded, its downsampling factor still applies
        scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    h, w = cfg.data.hw
    return comps.latent_channels, (h // scale, w // scale), scale


def _fresh_window() -> dict[str, float]:
    """The sums of one logging window (the metrics are per window, not since the start)."""
    keys = ("time", "wait", "steps", "clips", "tokens", "flops", "encoder_flops", "uncounted")
    return dict.fromkeys(keys, 0)


def train(cfg: Config, source=None) -> int:
    """Train until cfg.train.max_steps; returns the process exit code (0 done, 75 stopped for requeue,
    3 aborted after max_bad_steps non-finite steps)."""
    t_start = time.time()
    # DeepSpeed's ZeRO all-gather calls a torch API torch has deprecated: not actionable here
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    world = dist.detect_world()
    device = dist.device_for(world)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: pick the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls (loss, VAE in fp32) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    # signals only set a flag from here on: a USR1 during start-up is honoured at the first step
    stop = StopRequest(cfg.train.stop_after_steps, cfg.train.stop_after_minutes)
    watchdog = dist.Watchdog(cfg.deepspeed.timeout_s)
    dist.set_barrier_timeout(cfg.deepspeed.timeout_s)

    def log0(msg: str) -> None:
        dist.print0(f"[vldm.train {time.strftime('%H:%M:%S')}] {msg}", world=world)

    log0(
        f"rank {world.rank}/{world.world_size} via {world.launcher}, master {world.master_addr}:{world.master_port}, "
        f"device {device}"
    )
    # a generous bound here: DeepSpeed JIT-builds its CPU comm op in this call the first time (minutes on a
    # busy machine), and a process killed while holding torch's build lock would leave a stale lock that
    # makes every later run wait on it; the rendezvous itself is bounded by the process-group timeout
    watchdog.arm(max(cfg.deepspeed.timeout_s, 1800.0))
    dist.init_process_group(world, resolve_backend(cfg, device), cfg.deepspeed.timeout_s)
    # from here on, start-up (model loading, DeepSpeed engine, resume) is bounded; the loop arms the step bound
    watchdog.arm(max(cfg.deepspeed.timeout_s, dist.STARTUP_BOUND_S))
    torch.manual_seed(seed_of("init", cfg.seed))  # identical temporal-layer init on every rank

    # ---------------------------------------------------------------- model, objective, data
    built = build(cfg)
    precision = resolve_precision(cfg, device)
    objective = Objective(cfg, built, device)
    channels, latent_hw, vae_scale = latent_geometry(cfg, built)
    num_labels = objective.num_labels if cfg.diffusion.label_key else 0
    source = source or build_source(
        cfg, world.rank, world.world_size, channels, latent_hw, vae_scale, built.comps.vae is not None, num_labels
    )
    if device.type == "cuda":
        # pinned batches, the next one copied on a side stream during this step (vldm/train/prefetch.py)
        source = DevicePrefetcher(source, device)
    trainable = built.trainable()
    n_frozen = count([p for p in built.model.parameters() if not p.requires_grad])
    log0(
        f"stage={cfg.stage} task={cfg.task}: {count([p for _, p in trainable]) / 1e6:.2f}M trainable, "
        f"{n_frozen / 1e6:.2f}M frozen parameters; latents "
        + (
            f"{channels}x(one size per bucket, below); "
            if bucket_geometries(source, vae_scale)
            else f"{channels}x{cfg.data.num_frames}x{latent_hw[0]}x{latent_hw[1]}; "
        )
        + f"precision {precision}; ZeRO-{cfg.deepspeed.zero_stage}"
    )

    built.model.to(device)
    applied = apply_device_options(built.model, cfg, device)  # channels-last / regional compile, GPU only
    if applied:
        log0(f"device options: {', '.join(applied)}")
    buckets = bucket_geometries(source, vae_scale)
    geometries = list(buckets.values()) or [(cfg.data.num_frames, *latent_hw)]
    if buckets:
        log0(
            "buckets (data/bucket: pixels HxWxF -> latents FxHxW): "
            + ", ".join(f"{i}: {n} -> {'x'.join(map(str, g))}" for i, (n, g) in enumerate(buckets.items()))
        )
    # micro-batch FLOPs per clip geometry (one per bucket): trained (UNet as it runs) and encoders (VAE/text)
    flops_of: dict[tuple[int, int, int], int] = {}
    encoder_flops_of: dict[tuple[int, int, int], int] = {}
    if cfg.train.count_flops:
        kind = "latents" if (built.comps.vae is None or cfg.data.use_latents) else "pixels"
        for f, lh, lw in geometries:
            # a synthetic batch of the real shapes: the data position is untouched
            ch, hw = (channels, (lh, lw)) if kind == "latents" else (3, (lh * vae_scale, lw * vae_scale))
            probe_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_frames=f))
            probe = next(
                SyntheticClips(probe_cfg, 0, 1, ch, hw[0], hw[1], kind, num_labels, getattr(source, "text_shape", None))
            )
            # bf16 activations on a GPU: the count's one forward needs half the memory of an fp32 one, same FLOPs
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                counted = train_flops(
                    lambda: objective.loss(built.model, probe, step=-1, micro=0, rank=0)[0]  # noqa: B023 - called at once
                )
            flops_of[(f, lh, lw)], encoder_flops_of[(f, lh, lw)] = counted.trained, counted.encoders

    # ---------------------------------------------------------------- engine and resume
    plan = plan_resume(cfg, world.world_size)
    engine = parallelize(built.model, cfg, world.world_size, device)
    # of the fp32 masters: each rank its ZeRO partition
    ema = EMA(trainable, cfg.train.ema_decay, engine, cfg.train.ema_warmup)
    norm_skip = GradNormSkip(engine, cfg.optim.skip_grad_norm) if cfg.optim.skip_grad_norm else None
    if cfg.stage == "temporal":
        engine.module.unet.eval()  # frozen spatial layers: no dropout
    t0 = time.perf_counter()
    restore(plan, cfg, built, engine, ema, source, world)
    restore_s = time.perf_counter() - t0
    log0(plan.message + (f" in {restore_s:.1f} s" if plan.mode != "fresh" else ""))
    state = TrainState(
        **{
            k: plan.state[k]
            for k in ("step", "skipped_steps", "grad_spike_steps", "bad_streak", "clips_seen", "elapsed_s")
            + ("rewarmup_from",)
            if k in plan.state
        }
    )
    if plan.mode == "consolidated" and int(plan.state.get("world_size", world.world_size)) != world.world_size:
        # fresh Adam moments at another global batch: the schedule's full LR at once would take large,
        # badly scaled first steps (Adam's bias correction starts them at ~lr); optim.rewarmup_steps ramps it
        state.rewarmup_from = state.step
    if state.rewarmup_from >= 0 and cfg.optim.rewarmup_steps:
        log0(
            f"LR re-warm-up after the world-size change at step {state.rewarmup_from}: "
            f"{cfg.optim.rewarmup_steps} steps (optim.rewarmup_steps)"
        )
    checkpointer = Checkpointer(cfg, built, world)
    checkpointer.clean_partial(plan.skipped)
    if plan.mode != "fresh":
        checkpointer.last_saved_step = state.step  # the checkpoint we resumed from is this step's
    # rank 0's W&B start has a bound of its own (wandb.init_timeout_s for the server, then an offline start): the
    # start-up watchdog must not cut it (it did, at deepspeed.timeout_s=60 on a loaded machine), and the other
    # ranks wait for it at the barrier below, under the same bound, rather than in step 1's collective
    wandb_start_s = 2 * cfg.wandb.init_timeout_s if cfg.wandb.mode != "disabled" else 0.0
    watchdog.arm(max(cfg.deepspeed.timeout_s, dist.STARTUP_BOUND_S) + wandb_start_s)
    logger = build_logger(dataclasses.replace(cfg, model=built.model_cfg), world.is_main)
    if world.is_main:
        dump_yaml(dataclasses.replace(cfg, model=built.model_cfg), Path(cfg.run_dir) / RUN_CONFIG)
        if plan.mode != "fresh":
            logger.log(
                {"ckpt/restore_s": restore_s, "ckpt/resumed_with_fresh_optimizer": float(plan.mode == "consolidated")},
                state.step,
            )
    dist.barrier(cfg.deepspeed.timeout_s + wandb_start_s)
    peak = peak_tflops(device, cfg.train.peak_tflops) * 1e12
    micro_bs = cfg.data.batch_size * (cfg.data.num_frames if cfg.stage == "image" else 1)

    def trainer_state() -> dict:
        return {
            **dataclasses.asdict(state),
            "stage": cfg.stage,
            "wandb_run_id": getattr(logger, "run_id", None),
            "global_batch": micro_bs * cfg.train.grad_accum * world.world_size,
        }

    def save(reason: str) -> Path:
        watchdog.arm(cfg.deepspeed.timeout_s * 2)  # a save may take a while; it is still bounded
        path = checkpointer.save(engine, ema, source, trainer_state(), reason)
        log0(f"checkpoint {path} ({reason}) in {checkpointer.last_save_s:.1f} s")
        if world.is_main:
            logger.log({"ckpt/save_s": checkpointer.last_save_s, "ckpt/size_gb": dir_bytes(path) / 2**30}, state.step)
        return path

    inject_hits = cfg.train.debug_inject_rank in (-1, world.rank)
    inject_nan = set(cfg.train.debug_inject_nonfinite_steps) if inject_hits else set()
    inject_spike = set(cfg.train.debug_inject_grad_spike_steps) if inject_hits else set()
    inject_finite = set(cfg.train.debug_inject_finite_spike_steps) if inject_hits else set()
    if inject_nan or inject_spike or inject_finite:
        print(
            f"[vldm.train] rank {world.rank} REHEARSAL: injecting non-finite losses at steps {sorted(inject_nan)}, "
            f"inf gradient spikes at steps {sorted(inject_spike)}, finite (x1e6) gradient spikes at steps "
            f"{sorted(inject_finite)} (train.debug_inject_*)",
            flush=True,
        )

    def inject(loss: torch.Tensor, step: int) -> torch.Tensor:
        """train.debug_inject_*: the faults of a rehearsal, where the trainer sees them (the loss)."""
        if step in inject_nan:
            return loss * float("nan")
        if step in inject_spike:
            return ScaleGrad.apply(loss, float("inf"))
        if step in inject_finite:
            return ScaleGrad.apply(loss, 1e6)
        return loss

    # ---------------------------------------------------------------- the loop
    data = iter(source)
    steps_this_job, exit_code, job_t0 = 0, 0, time.perf_counter()
    window = _fresh_window()
    try:
        while state.step < cfg.train.max_steps:
            watchdog.arm()
            t_step = time.perf_counter()
            lr = lr_at(state.step, cfg.optim, cfg.train.max_steps, state.rewarmup_from)
            set_lr(engine, lr)
            skipped_before = engine.skipped_steps
            loss_sum, clips, wait = torch.zeros((), device=device), 0, 0.0
            for micro in range(cfg.train.grad_accum):
                t_wait = time.perf_counter()
                batch = next(data)
                wait += time.perf_counter() - t_wait
                loss, n = objective.loss(engine, batch, state.step, micro, world.rank)
                loss = inject(loss, state.step + 1)
                engine.backward(loss)  # a non-finite loss gives non-finite gradients: DeepSpeed skips the update
                engine.step()
                loss_sum += loss.detach().float()
                clips += n
                # tokens = latent positions (of one image per sample in stage=image); every rank's batch has
                # this shape (one bucket per step on all ranks), so the global count is world_size times it
                geom = clip_geometry(batch, vae_scale) or geometries[0]
                window["tokens"] += n * (1 if cfg.stage == "image" else geom[0]) * geom[1] * geom[2] * world.world_size
                window["flops"] += flops_of.get(geom, 0)
                window["encoder_flops"] += encoder_flops_of.get(geom, 0)
                window["uncounted"] += geom not in flops_of
            # one collective per step: [loss, non-finite ranks, ranks asking to stop, ranks that saw a norm spike]
            # built on the device (no .item() of the loss): the one host read of the step is the reduced
            # vector, which the stop and skip decisions need on every rank; it also ends the step's timing
            local_loss = (loss_sum / cfg.train.grad_accum).double()
            finite = torch.isfinite(local_loss)
            asks_stop = torch.tensor(float(stop.local(steps_this_job + 1)), dtype=torch.float64)
            # the spike decision is already the same on every rank (a global norm); summed here it costs nothing
            spiked, spike_norm = norm_skip.take(device) if norm_skip else (torch.zeros((), device=device), None)
            vec = torch.stack(
                [torch.where(finite, local_loss, 0.0), (~finite).double(), asks_stop.to(device), spiked.double()]
            )
            agreed = dist.all_reduce(vec).cpu()
            state.step += 1
            steps_this_job += 1
            step_time = time.perf_counter() - t_step
            state.elapsed_s += step_time
            nonfinite_ranks, stopping, norm_spike = int(agreed[1]), agreed[2] > 0, bool(agreed[3] > 0)
            skipped = engine.skipped_steps > skipped_before
            # fp16 overflows of the loss scale are routine and not "bad"; a non-finite loss or a norm spike is
            bad = nonfinite_ranks > 0 or norm_spike or (skipped and precision != "fp16")
            state.skipped_steps += int(skipped)
            state.grad_spike_steps += int(norm_spike)
            state.bad_streak = state.bad_streak + 1 if bad else 0
            state.clips_seen += clips * world.world_size
            if not skipped:
                ema.update()
            window["time"] += step_time
            window["wait"] += wait
            window["steps"] += 1
            window["clips"] += clips * world.world_size

            if state.step % cfg.train.log_every == 0 or bad or state.step == cfg.train.max_steps:
                mem = dist.all_reduce(torch.tensor([peak_memory_gb(device)], dtype=torch.float64), "max")
                per_step = window["time"] / window["steps"]
                clips_per_s = window["clips"] / window["time"]
                metrics = {
                    # mean of the ranks' losses; NaN (not a partial mean) when any rank's was not finite
                    "train/loss": agreed[0].item() / world.world_size if nonfinite_ranks == 0 else float("nan"),
                    "train/lr": lr,
                    # a skipped spike: the norm that was too large (DeepSpeed reports inf for any skipped step)
                    "train/grad_norm": spike_norm.item() if norm_spike else grad_norm(engine),
                    "train/skipped_steps": state.skipped_steps,
                    "train/grad_spike_steps": state.grad_spike_steps,
                    "train/clips_seen": state.clips_seen,
                    "perf/step_time_s": per_step,
                    "perf/clips_per_s": clips_per_s,
                    "perf/clips_per_s_per_gpu": clips_per_s / world.world_size,
                    "perf/tokens_per_s": window["tokens"] / window["time"],
                    "perf/data_wait_frac": window["wait"] / window["time"],
                    "perf/peak_mem_gb": mem.item(),
                }
                if precision == "fp16":
                    metrics["train/loss_scale"] = float(engine.optimizer.loss_scale)
                metrics.update(data_metrics(source, batch))  # the shard loader's, over all ranks (a collective)
                if objective.missing_labels:
                    metrics["train/missing_labels"] = objective.missing_labels
                if flops_of and not window["uncounted"]:
                    flops_s = window["flops"] / window["time"]  # per rank, over this window's buckets
                    metrics["perf/tflops_per_gpu"] = flops_s / 1e12
                    if peak:
                        metrics["perf/mfu"] = flops_s / peak
                if encoder_flops_of and not window["uncounted"] and window["encoder_flops"]:
                    # VAE / text encoder on pixels and captions: not trained, not in MFU
                    metrics["perf/encoder_tflops_per_gpu"] = window["encoder_flops"] / window["time"] / 1e12
                logger.log(metrics, state.step)
                log0(
                    f"step {state.step}/{cfg.train.max_steps} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
                    f"gnorm {metrics['train/grad_norm']:.3f} {per_step:.3f} s/step {clips_per_s:.2f} clips/s "
                    f"wait {metrics['perf/data_wait_frac']:.0%} mem {mem.item():.2f} GB"
                    + (" SKIPPED" if skipped else "")
                    + (
                        f" (gradient norm above optim.skip_grad_norm={cfg.optim.skip_grad_norm:g})"
                        if norm_spike
                        else ""
                    )
                )
                window = _fresh_window()

            if state.bad_streak >= cfg.train.max_bad_steps:
                # the weights have not changed since the streak began: this is the last good state
                path = save(f"abort after {state.bad_streak} skipped steps")
                log0(
                    f"ERROR: {state.bad_streak} consecutive steps had a non-finite loss or gradient, or a gradient "
                    "norm above optim.skip_grad_norm "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); stopped at step {state.step}. The weights of "
                    "the "
                    f"last good step are in {path}. Lower optim.lr, check the data, or raise train.max_bad_steps."
                )
                exit_code = ABORT_EXIT
                break
            if state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.max_steps:
                save("periodic" if state.step < cfg.train.max_steps else "final")
            if stopping and state.step < cfg.train.max_steps:
                if checkpointer.last_saved_step != state.step:
                    save(f"stop: {stop.reason(steps_this_job)}")
                log0(
                    f"stopped at step {state.step} ({stop.reason(steps_this_job)}): exit {REQUEUE_EXIT} "
                    "so the job is requeued; it resumes from this checkpoint"
                )
                exit_code = REQUEUE_EXIT
                logger.preempting()
                break
        else:
            if checkpointer.last_saved_step != state.step:
                save("final")
            log0(
                f"done: {state.step} steps, {state.skipped_steps} skipped, {time.perf_counter() - job_t0:.1f} s in "
                "this job, "
                f"{time.time() - t_start:.1f} s with start-up"
            )
        logger.finish(0 if exit_code == REQUEUE_EXIT else exit_code)
        if world.is_main:
            write_exit_status(cfg.run_dir, exit_code, state.step, cfg.train.max_steps)
        dist.barrier()  # nobody exits before rank 0 has finished W&B and written the status
        watchdog.disarm()
        stop.restore()
        dist.shutdown()
        return process_exit_code(exit_code, world.launcher)
    except Exception:
        # no collective after an error: a peer may be gone. Print, and let the launcher end the job.
        traceback.print_exc()
        logger.finish(1)
        os._exit(1)

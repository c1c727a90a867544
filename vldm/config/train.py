"""Training sections: diffusion objective, optimiser, loop, checkpoints, DeepSpeed, W&B."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = field_(1000, "diffusion steps of the noise schedule")
    beta_schedule: str = field_("scaled_linear", "diffusers beta schedule (scaled_linear is SD's)")
    beta_start: float = field_(0.00085, "first beta")
    beta_end: float = field_(0.012, "last beta")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = field_(
        "auto", "what the UNet predicts; auto = the base model's scheduler config (epsilon if none)"
    )
    loss_weighting: Literal["none", "min_snr"] = field_("none", "per-timestep loss weighting")
    snr_gamma: float = field_(5.0, "gamma of min_snr weighting")
    scheduler_from_model: bool = field_(True, "read the schedule from <model.pretrained>/scheduler when it exists")
    text_dropout: float = field_(0.1, "probability of an empty caption (classifier-free guidance)")
    label_key: str = field_(
        "", "class label of a clip: dotted field of its metadata (e.g. meta.weather); empty = no class labels"
    )
    class_names: tuple[str, ...] = field_(
        (), "label names in index order when labels are strings (e.g. day,night); empty = labels are ints"
    )
    label_dropout: float = field_(0.1, "probability of the 'no label' class (guidance over class labels)")

    def validate(self) -> None:
        for name in ("text_dropout", "label_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"diffusion.{name}: must be in [0, 1]")
        if self.num_train_timesteps < 1:
            raise ConfigError("diffusion.num_train_timesteps: must be >= 1")


@dataclass
class OptimConfig:
    lr: float = field_(1e-4, "peak learning rate")
    weight_decay: float = field_(0.0, "AdamW weight decay")
    betas: tuple[float, float] = field_((0.9, 0.999), "AdamW betas")
    eps: float = field_(1e-8, "AdamW epsilon")
    warmup_steps: int = field_(0, "linear warm-up steps (from 0 to lr)")
    schedule: Literal["constant", "cosine"] = field_("constant", "LR schedule after warm-up")
    min_lr_ratio: float = field_(0.0, "cosine: final LR as a fraction of lr")
    grad_clip: float = field_(1.0, "gradient norm clip (0 = off)")
    skip_grad_norm: float = field_(
        0.0,
        "skip the update of a step whose global gradient norm (before clipping, over all ranks) exceeds this, on "
        "every rank, like a non-finite one (counted in train/skipped_steps and train/grad_spike_steps; "
        "train.max_bad_steps in a row abort); 0 = off (a finite spike is only clipped). DeepSpeed ZeRO 1/2 only",
    )
    rewarmup_steps: int = field_(
        0,
        "after a resume at another world size (fresh Adam moments): ramp the LR linearly from 0 to the schedule's "
        "value over this many steps; 0 = off (the schedule's LR at once)",
    )

    def validate(self) -> None:
        if self.lr < 0:
            raise ConfigError("optim.lr: must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio: must be in [0, 1]")
        if self.grad_clip < 0:
            raise ConfigError("optim.grad_clip: must be >= 0")
        if not self.skip_grad_norm >= 0:  # also rejects nan
            raise ConfigError("optim.skip_grad_norm: must be >= 0 (0 = off)")
        if self.rewarmup_steps < 0:
            raise ConfigError("optim.rewarmup_steps: must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = field_(20, "optimizer steps to train (the run ends at this step, across requeues)")
    grad_accum: int = field_(
        1, "micro-steps per optimizer step (global batch = data.batch_size x grad_accum x world size)"
    )
    ema_decay: float = field_(0.999, "EMA decay of trainable parameters (0 = no EMA)")
    ema_warmup: bool = field_(
        False,
        "EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates (diffusers' EMAModel): short from-scratch runs "
        "do not keep their random initialisation in the EMA (0.99^150 = 22 %)",
    )
    log_every: int = field_(1, "log metrics every n steps")
    max_bad_steps: int = field_(
        5,
        "abort after this many consecutive skipped steps (non-finite loss or gradient, or a gradient norm above "
        "optim.skip_grad_norm)",
    )
    image_ratio: float = field_(
        0.0,
        "joint image/video batches: fraction of each micro-batch's clips treated as independent frames "
        "(image_only_indicator; a = 1, temporal layers bypassed)",
    )
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field_(
        "auto", "dtype of the frozen VAE encoder and text encoder (auto = bfloat16 on GPU, float32 on CPU)"
    )
    stop_after_steps: int = field_(
        0, "stop like a preemption (checkpoint, exit code 75, requeue) after this many steps in one job; 0 = off"
    )
    stop_after_minutes: float = field_(
        0.0, "stop like a preemption after this many minutes in one job (for clusters without --signal); 0 = off"
    )
    count_flops: bool = field_(True, "count the FLOPs of one micro-batch at start (torch flop counter) for perf/mfu")
    peak_tflops: float = field_(
        0.0, "per-device peak TFLOP/s for perf/mfu; 0 = the known bf16 dense peak of the GPU (none on CPU)"
    )
    metrics_file: bool = field_(True, "also append every logged step to RUN/logs/metrics.jsonl (rank 0)")
    debug_inject_nonfinite_steps: tuple[int, ...] = field_(
        (),
        "REHEARSAL AID (fault drills, tests): at these optimizer steps (1-based) the loss of debug_inject_rank is "
        "made NaN; never set it in a real run",
    )
    debug_inject_grad_spike_steps: tuple[int, ...] = field_(
        (),
        "REHEARSAL AID: at these steps the loss stays finite but its gradients on debug_inject_rank are "
        "multiplied by inf (a gradient-norm spike past what the precision holds); never set it in a real run",
    )
    debug_inject_finite_spike_steps: tuple[int, ...] = field_(
        (),
        "REHEARSAL AID: at these steps the gradients on debug_inject_rank are multiplied by 1e6 (a finite "
        "gradient-norm spike, for optim.skip_grad_norm); never set it in a real run",
    )
    debug_inject_rank: int = field_(-1, "REHEARSAL AID: the rank the debug_inject_* faults hit; -1 = every rank")
    compile: bool = field_(
        False, "regional torch.compile of each temporal layer (GPU only: ignored on CPU, where it is not faster)"
    )
    channels_last: bool = field_(
        False, "channels-last memory format for the UNet's convolutions (GPU only; CPU keeps contiguous NCHW)"
    )

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay: must be in [0, 1)")
        if not 0.0 <= self.image_ratio < 1.0:
            raise ConfigError("train.image_ratio: must be in [0, 1)")
        if self.stop_after_steps < 0 or self.stop_after_minutes < 0:
            raise ConfigError("train.stop_after_steps / stop_after_minutes: must be >= 0")
        for name in (
            "debug_inject_nonfinite_steps",
            "debug_inject_grad_spike_steps",
            "debug_inject_finite_spike_steps",
        ):
            if any(s < 1 for s in getattr(self, name)):
                raise ConfigError(f"train.{name}: steps are 1-based (>= 1)")


@dataclass
class CheckpointConfig:
    every: int = field_(500, "save a checkpoint every n steps (and at the end, on a stop signal and before an abort)")
    keep_last: int = field_(3, "complete checkpoints kept (older ones are deleted after a save)")
    resume: str = field_(
        "auto", "auto = newest complete checkpoint of run_dir (fresh start if none); never; or a checkpoint directory"
    )
    save_optimizer: bool = field_(
        True,
        "write the DeepSpeed ZeRO state (optimizer + master weights, frozen parameters excluded); off = weights, EMA "
        "and trainer state only",
    )

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("checkpoint.every: must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last: must be >= 1")
        if not self.resume:
            raise ConfigError("checkpoint.resume: auto, never or a checkpoint directory")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field_(2, "ZeRO stage: 0 (DDP), 1 (optimizer states sharded), 2 (+ gradients sharded)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field_(
        "auto", "training precision; auto = bf16 on GPU, fp32 on CPU"
    )
    overlap_comm: bool = field_(True, "overlap gradient reduction with the backward pass")
    contiguous_gradients: bool = field_(
        True, "copy gradients into one buffer as they are produced (less fragmentation)"
    )
    reduce_scatter: bool = field_(True, "reduce gradients with reduce-scatter instead of all-reduce")
    reduce_bucket_size: int = field_(200_000_000, "elements per gradient-reduction bucket")
    allgather_bucket_size: int = field_(200_000_000, "elements per parameter all-gather bucket after the step")
    fp16_initial_scale_power: int = field_(16, "fp16 only: initial dynamic loss scale 2**n")
    backend: Literal["auto", "nccl", "gloo"] = field_("auto", "collective backend; auto = nccl on GPU, gloo on CPU")
    timeout_s: float = field_(
        1800.0, "a collective, barrier or step stuck this long ends the process (dead-rank watchdog)"
    )

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"deepspeed.zero_stage: must be 0, 1 or 2 (got {self.zero_stage})")
        if self.reduce_bucket_size < 1 or self.allgather_bucket_size < 1:
            raise ConfigError("deepspeed.reduce_bucket_size / allgather_bucket_size: must be >= 1")
        if self.timeout_s <= 0:
            raise ConfigError("deepspeed.timeout_s: must be > 0")


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = field_(
        "offline",
        "online needs WANDB_API_KEY; offline writes a run to sync later (`wandb sync`); disabled logs nothing",
    )
    project: str = field_("vldm", "W&B project")
    entity: str = field_("", "W&B entity (team or user); empty = the API key's default")
    group: str = field_("", "W&B group (eval runs join it); empty = the run_dir's name")
    name: str = field_("", "display name; empty = the run_dir's name")
    tags: tuple[str, ...] = field_((), "W&B tags")
    id: str = field_(
        "", "run id; empty = derived from the absolute run_dir, so requeues and restarts continue the same run"
    )
    init_timeout_s: float = field_(
        60.0,
        "online: wait at most this long for the W&B server at start, then warn and log to offline files "
        "(`wandb sync` them later); training never waits longer",
    )
    call_timeout_s: float = field_(
        30.0,
        "each W&B call of the training loop (log, mark_preempting) may take at most this long; a call that hangs or "
        "fails (the W&B service process died or stopped) makes the job go on in a fresh OFFLINE W&B run under the "
        "same run id, with one warning (if that fails too: W&B off); every step stays in RUN/logs/metrics.jsonl",
    )
    finish_timeout_s: float = field_(
        120.0,
        "wandb.finish at the end of a job (it waits for the upload) may take at most this long; then the run exits "
        "anyway and the run's local W&B files stay for `wandb sync`",
    )
    replay_rows: int = field_(
        10000,
        "rows kept in memory to re-log into the offline fallback run those that W&B's failed service had not "
        "written to its run file (older rows are assumed written; the warning names any gap)",
    )

    def validate(self) -> None:
        for name in ("init_timeout_s", "call_timeout_s", "finish_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"wandb.{name}: must be > 0")
        if self.replay_rows < 1:
            raise ConfigError("wandb.replay_rows: must be >= 1")

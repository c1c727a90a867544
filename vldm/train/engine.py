"""Parallelism is applied to the model here, from the typed config: a DeepSpeed engine with ZeRO.

The DeepSpeed config is built in code from `cfg.deepspeed`, `cfg.optim`, `cfg.train` and
`cfg.data.batch_size` (no JSON file to keep in sync). The optimizer is a plain `torch.optim.AdamW`
over the trainable parameters only: the frozen spatial layers get no optimizer state, no gradient
buffer and no ZeRO partition, and DeepSpeed's own fused Adam (a 41 s JIT build on CPU) is never built.
The learning rate is set by the training loop each step (vldm.train.lr), so the engine has no scheduler.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vldm.config import ConfigError
from vldm.config.schema import Config


def resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def resolve_backend(cfg: Config, device: torch.device) -> str:
    b = cfg.deepspeed.backend
    if b == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return b


def model_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def precision_problem(cfg: Config, precision: str) -> str | None:
    """Why `cfg` would accumulate gradients in bf16 (unsafe), or None.

    DeepSpeed 0.19.8 picks the bf16 optimizer by ZeRO stage and `grad_accum_dtype`: stage 1 with fp32
    accumulation -> its BF16_Optimizer (fp32 gradient buffer, sharded fp32 masters); stage 2 -> the ZeRO
    optimizer with an fp32 `grad_accum` per parameter; stage 0 -> no fp32 accumulation at all (fp32 with a
    bf16 module raises NotImplementedError; without it the micro-batch gradients are summed in bf16 in
    `param.grad`). One micro-batch per step sums nothing, so only stage 0 with grad_accum > 1 is refused."""
    if precision == "bf16" and cfg.deepspeed.zero_stage == 0 and cfg.train.grad_accum > 1:
        return (
            f"deepspeed.zero_stage: 0 with bf16 and train.grad_accum={cfg.train.grad_accum} would sum the "
            "micro-batch gradients in bf16 (DeepSpeed has no fp32 gradient accumulation without ZeRO); use "
            "deepspeed.zero_stage=1 (fp32 accumulation, optimizer states sharded) or train.grad_accum=1"
        )
    return None


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict, entirely derived from the typed config."""
    problem = precision_problem(cfg, precision)
    if problem:
        raise ConfigError(problem)
    d = cfg.deepspeed
    micro = cfg.data.batch_size
    out: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": d.zero_stage,
            "overlap_comm": d.overlap_comm,
            "contiguous_gradients": d.contiguous_gradients,
            "reduce_scatter": d.reduce_scatter,
            "reduce_bucket_size": d.reduce_bucket_size,
            "allgather_bucket_size": d.allgather_bucket_size,
        },
        # a torch optimizer under ZeRO: DeepSpeed calls that "untested", it is what we want
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # set here, not left to DeepSpeed's version defaults:
        # - check_grad_overflow: a non-finite gradient skips the update (engine.skipped_steps; the trainer's
        #   max_bad_steps counts on it);
        # - communication_data_type fp32: gradients are averaged over ranks in fp32, not bf16 (8 bits of
        #   mantissa lose small per-rank contributions summed over 8+ GPUs);
        # - grad_accum_dtype fp32: micro-step gradients accumulate in fp32 at ZeRO 1/2 (precision_problem:
        #   DeepSpeed has none at stage 0, where one micro-batch per step is required instead)
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}
        out["communication_data_type"] = "fp32"
        if d.zero_stage >= 1:
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": d.fp16_initial_scale_power}
        out["communication_data_type"] = "fp32"  # fp16 sums over ranks overflow sooner than the loss scale knows
    return out


def build_optimizer(params: list[nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if device.type == "cuda":
        kw["fused"] = True  # one kernel for all parameters
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(params, **kw)


def parallelize(model: nn.Module, cfg: Config, world_size: int, device: torch.device):
    """Wrap `model` in a DeepSpeed engine; only parameters with requires_grad are optimised.

    Returns the engine; `engine.module` is the model (cast to the training precision), `engine.optimizer`
    the ZeRO optimizer around the AdamW.
    """
    import deepspeed

    precision = resolve_precision(cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the model has no trainable parameters")
    model.to(device)
    optimizer = build_optimizer(trainable, cfg, device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, precision), dist_init_required=False
    )
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float:
    """Global gradient norm of the last step (before clipping); nan when DeepSpeed has none."""
    n = engine.get_global_grad_norm()
    if n is None:
        return float("nan")
    return float(n.item() if isinstance(n, torch.Tensor) else n)


class GradNormSkip:
    """optim.skip_grad_norm: a finite gradient-norm spike skips the update like a non-finite gradient.

    DeepSpeed's ZeRO 1/2 optimizer computes the global norm once per step (all-reduced over the data-parallel
    group, so every rank holds the same value) and skips the update on every rank when it is invalid. This
    wraps that norm: above the threshold it is reported as inf, so DeepSpeed's own skip path runs (gradients
    dropped, no Adam update, engine.skipped_steps + 1) at the same step on every rank. The decision stays a
    device tensor: no host read beyond the one DeepSpeed already makes for its overflow check. fp16: the skip
    also halves the loss scale, as an overflow would."""

    def __init__(self, engine, threshold: float):
        opt = engine.optimizer
        if not hasattr(opt, "scaled_global_norm"):
            raise RuntimeError(
                f"optim.skip_grad_norm: the DeepSpeed optimizer {type(opt).__name__} has no scaled_global_norm "
                "(ZeRO stage 1 or 2 is needed)"
            )
        self.threshold = threshold
        self.spiked: torch.Tensor | None = None  # this step's decision (a 0-d bool tensor), None if not computed
        self.norm: torch.Tensor | None = None  # this step's unscaled global norm
        original = opt.scaled_global_norm

        def scaled_global_norm(norm_type=2):
            scaled = original(norm_type)
            self.norm = scaled / opt.loss_scale
            self.spiked = torch.isfinite(self.norm) & (self.norm > threshold)
            return torch.where(self.spiked, torch.full_like(scaled, float("inf")), scaled)

        opt.scaled_global_norm = scaled_global_norm

    def take(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(spiked as a float64 0/1 device tensor, the unscaled norm or None) of the step just done; resets."""
        spiked = torch.zeros((), dtype=torch.float64, device=device) if self.spiked is None else self.spiked.double()
        norm, self.spiked, self.norm = self.norm, None, None
        return spiked, norm

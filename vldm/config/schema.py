"""The one config schema. Every section lives in its own module; this file only composes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vldm.config.core import ConfigError, field_
from vldm.config.data import DataConfig
from vldm.config.decoder import DecoderConfig
from vldm.config.model import ModelConfig
from vldm.config.train import (
    CheckpointConfig,
    DeepSpeedConfig,
    DiffusionConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
)


@dataclass
class Config:
    stage: Literal["image", "temporal", "decoder"] = field_(
        "temporal",
        "image: train the whole image UNet on frames; temporal: freeze it, train temporal layers; decoder: fine-tune "
        "the autoencoder's video decoder (vldm.train.decoder)",
    )
    task: str = field_(
        "generate", "what the temporal model learns: generate | predict | interpolate | upsample (vldm.tasks)"
    )
    task_options: dict[str, Any] = field_(
        default_factory=dict,
        help=(
            "options of the task, e.g. {context_frames: [0, 1, 2]} for predict (vldm.config.tasks *Options); unknown "
            "keys are errors"
        ),
    )
    run_dir: str = field_("outputs/run", "where checkpoints, the resolved config and logs go")
    seed: int = field_(0, "global seed")
    model: ModelConfig = field_(default_factory=ModelConfig, help="model")
    data: DataConfig = field_(default_factory=DataConfig, help="data")
    diffusion: DiffusionConfig = field_(default_factory=DiffusionConfig, help="diffusion objective")
    optim: OptimConfig = field_(default_factory=OptimConfig, help="optimiser")
    train: TrainConfig = field_(default_factory=TrainConfig, help="training loop")
    checkpoint: CheckpointConfig = field_(default_factory=CheckpointConfig, help="checkpoints and resume")
    deepspeed: DeepSpeedConfig = field_(
        default_factory=DeepSpeedConfig, help="DeepSpeed engine (built in code from these fields)"
    )
    wandb: WandbConfig = field_(default_factory=WandbConfig, help="Weights & Biases logging")
    decoder: DecoderConfig = field_(default_factory=DecoderConfig, help="video decoder fine-tuning (stage=decoder)")

    def validate(self) -> None:
        if self.optim.skip_grad_norm and (self.stage == "decoder" or self.deepspeed.zero_stage not in (1, 2)):
            # the skip hooks the global norm of DeepSpeed's ZeRO 1/2 optimizer (vldm.train.engine)
            raise ConfigError(
                "optim.skip_grad_norm: needs deepspeed.zero_stage 1 or 2 and stage image/temporal "
                f"(got zero_stage={self.deepspeed.zero_stage}, stage={self.stage})"
            )
        if self.stage == "decoder":
            # only a decoder run needs its LPIPS file: every other run carries the section's defaults
            self.decoder.validate_for_training()

"""Training tasks: what the model is asked to do with a clip of clean latents.

The trainer is task-agnostic: per micro-batch it computes clean latents `z` (b c f h w) and the text
embedding, then asks the task for the extra forward inputs (masks and context frames for prediction
and interpolation, low-res frames and noise level for the upsampler) and which frames the loss covers.
Each task also states the temporal options the model needs (extra channels, conditions), merged into
`model.temporal` before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TaskInputs:
    """Extra inputs for one micro-batch."""

    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to VideoLDMUNet.forward
    extra_channels: torch.Tensor | None = None  # (b, extra, f, h, w) concatenated to the noisy latents
    loss_mask: torch.Tensor | None = None  # (b, 1, f, 1, 1) 1 = frame counts in the loss (None = all)
    target_latents: torch.Tensor | None = None  # what to denoise if not the input clip (e.g. high-res)


class Task:
    name = "generate"

    def required_temporal_options(self) -> dict[str, Any]:
        """Options the model must be built with, e.g. {"temporal_cond_channels": 5}."""
        return {}

    def training_inputs(self, latents: torch.Tensor, batch: dict, generator: torch.Generator | None) -> TaskInputs:
        return TaskInputs()


class GenerateTask(Task):
    """Plain text/class-to-video: denoise the whole clip (the paper's key-frame model)."""

    name = "generate"

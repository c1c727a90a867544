"""Options of the paper's tasks (`task_options` in a run's config), by task name.

Torch-free, like the rest of `vldm.config`: the pre-flight check (`python -m vldm.train ... --check`, run by the
sbatch script before any rank starts) validates `task_options` without importing torch or diffusers. The tasks
themselves (`vldm.tasks.paper`) take these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vldm.config.core import ConfigError, field_, from_dict


@dataclass
class PredictOptions:
    latent_channels: int = field_(4, "latent channels c of the base model: the condition has c + 1 channels")
    context_frames: tuple[int, ...] = field_(
        (0, 1, 2),
        "numbers S of given first frames drawn per clip; S = 0 is the unconditional branch for context guidance",
    )
    context_probs: tuple[float, ...] = field_((), "probabilities of context_frames (empty = uniform)")
    loss_frames: Literal["generated", "all"] = field_(
        "generated", "frames in the loss: the non-context frames only, or all"
    )

    def validate(self) -> None:
        if self.context_probs and len(self.context_probs) != len(self.context_frames):
            raise ConfigError("context_probs: needs one probability per context_frames entry")
        if any(s < 0 for s in self.context_frames):
            raise ConfigError("context_frames: must be >= 0")


@dataclass
class InterpolateOptions:
    latent_channels: int = field_(4, "latent channels c of the base model: the condition has c + 1 channels")
    factor: int = field_(
        4, "frame-rate factor: key frames at every factor-th position, factor - 1 frames predicted between them"
    )
    window: int = field_(0, "frames per training window, factor * k + 1 (0 = the longest that fits the clip)")
    stages: tuple[int, ...] = field_(
        (0, 1),
        "stage labels trained: 1 = the last (finest) stage uses the clip's own frame rate, 0 = the stage before it "
        "uses every factor-th frame (needs clips of factor * (window - 1) + 1 frames)",
    )
    stage_probs: tuple[float, ...] = field_((), "probabilities of stages (empty = uniform)")
    fps_key: str = field_(
        "fps",
        "batch key (or key of each clip's meta) holding the frame rate of the stored video; the training clips' rate "
        "is it / data.frame_stride (the trainer passes the stride as batch['frame_stride'])",
    )
    fps: float = field_(8.0, "frame rate of the training clips (after data.frame_stride) when the batch carries none")
    fps_condition: bool = field_(True, "condition on the output frame rate (scalar condition 'fps')")
    context_dropout: float = field_(
        0.1, "probability of hiding the key frames of a clip (the unconditional branch of context guidance)"
    )
    loss_frames: Literal["generated", "all"] = field_(
        "generated", "frames in the loss: the in-between frames only, or all"
    )

    def validate(self) -> None:
        if self.factor < 2:
            raise ConfigError("factor: must be >= 2")
        if self.window and (self.window - 1) % self.factor:
            raise ConfigError(f"window: must be factor * k + 1, got {self.window}")
        if not self.stages or any(s not in (0, 1) for s in self.stages):
            raise ConfigError("stages: a non-empty subset of (0, 1)")


@dataclass
class UpsampleOptions:
    scale: int = field_(4, "upsampling factor between the low-res input and the output pixels")
    condition_via: Literal["unet", "temporal"] = field_(
        "unet",
        "unet: the image UNet is an upscaler (in_channels = latent + low-res channels, noise level as its class "
        "label, e.g. SD x4); temporal: a plain image UNet gets the low-res frames through zero-initialised extra "
        "input channels and the noise level as a scalar condition",
    )
    lowres_channels: int = field_(3, "channels of the low-res frames (3 = RGB pixels)")
    pixels_key: str = field_(
        "pixels", "batch key of the clip's pixels (b, 3, f, H, W) in [-1, 1]; the low-res input is made from them"
    )
    max_noise_level: int = field_(
        350, "noise augmentation: the level t_g is drawn from [0, max_noise_level] (SD x4: 350)"
    )
    patch_size: int = field_(
        0,
        "train on random patches of this many latent pixels (0 = whole frames); the model is applied convolutionally "
        "at sampling",
    )

    def validate(self) -> None:
        if self.scale < 1 or self.max_noise_level < 0 or self.patch_size < 0:
            raise ConfigError("scale >= 1, max_noise_level >= 0 and patch_size >= 0 required")


# task name -> its options dataclass (None: the task takes no options)
TASK_OPTIONS: dict[str, type | None] = {
    "generate": None,
    "predict": PredictOptions,
    "interpolate": InterpolateOptions,
    "upsample": UpsampleOptions,
}


def check_task_options(task: str, options: dict[str, Any]) -> None:
    """Raise ConfigError naming the key if `task` is unknown or `options` do not fit it."""
    if task not in TASK_OPTIONS:
        raise ConfigError(f"task: unknown task {task!r}; known: {sorted(TASK_OPTIONS)}")
    cls = TASK_OPTIONS[task]
    if cls is None:
        if options:
            raise ConfigError(f"task_options: task {task!r} takes no options, got {sorted(options)}")
        return
    from_dict(cls, options, prefix=f"task_options[{task}]")

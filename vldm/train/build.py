"""What the trainer trains, per stage: the model, its trainable parameters, and how they are saved.

stage=temporal: `VideoLDMUNet` on the frozen image UNet; trainable = `temporal_parameters()`, saved as
`temporal.safetensors` (VideoLDMUNet.save_temporal format). The task's required temporal options (extra
channels, conditions) are merged into `model.temporal` before the model is built.
stage=image: the whole `UNet2DConditionModel` trains on frames; saved with `save_pretrained` (unet/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from vldm.config.core import from_dict, to_dict
from vldm.config.model import ModelConfig, TemporalOptions
from vldm.config.schema import Config
from vldm.models.base import Components, build_video_unet, load_components
from vldm.tasks import Task, get_task


@dataclass
class Built:
    model: nn.Module  # VideoLDMUNet (temporal) or UNet2DConditionModel (image)
    comps: Components
    task: Task
    model_cfg: ModelConfig  # with the task's temporal options merged in (what the run saves)
    prefix: str  # name prefix of trainable parameters in model.named_parameters()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def merge_task_options(temporal: TemporalOptions, task: Task) -> TemporalOptions:
    """model.temporal with what the task needs (tuples such as scalar_conds are united, not replaced)."""
    opts: dict[str, Any] = to_dict(temporal)
    for k, v in task.required_temporal_options().items():
        if isinstance(v, (tuple, list)) and opts.get(k):
            opts[k] = list(dict.fromkeys(list(opts[k]) + list(v)))
        else:
            opts[k] = v
    return from_dict(TemporalOptions, opts, prefix="model.temporal")


def build(cfg: Config, load_encoders: bool = True) -> Built:
    """Load the base model and build the stage's trainable model (on CPU, float32)."""
    task = get_task(cfg.task, **cfg.task_options)
    model_cfg = dataclasses.replace(cfg.model, temporal=merge_task_options(cfg.model.temporal, task))
    # latents in the shards make the VAE unnecessary; the text encoder is still needed for captions
    comps = load_components(model_cfg, load_vae=load_encoders and not cfg.data.use_latents, load_text=load_encoders)
    if cfg.stage == "image":
        unet = comps.unet2d
        unet.requires_grad_(True).train()
        if model_cfg.temporal.gradient_checkpointing != "off":
            unet.enable_gradient_checkpointing()
        return Built(unet, comps, task, model_cfg, prefix="")
    model = build_video_unet(model_cfg, comps)
    model.freeze_spatial()
    model.set_gradient_checkpointing(model_cfg.temporal.gradient_checkpointing)
    model.set_attention_backend(model_cfg.temporal.attention_backend, model_cfg.temporal.attn_max_batch)
    model.train()
    # frozen spatial layers stay in eval mode (no dropout); only the temporal layers train
    model.unet.eval()
    # trainable = temporal.* and conditioning.*: saved under these names (temporal checkpoint format 2)
    return Built(model, comps, task, model_cfg, prefix="")


def count(params: list[nn.Parameter] | list[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def apply_device_options(model: nn.Module, cfg: Config, device: torch.device) -> list[str]:
    """`train.channels_last` and `train.compile` on a GPU (after the model is on it); nothing on CPU, where
    channels-last convs are slower and the model keeps its contiguity workaround. Returns what was applied.

    compile is regional: each temporal layer is compiled on its own (`nn.Module.compile`, in place), so a
    compile takes seconds, not the minutes of a whole UNet, and the frozen diffusers blocks run eagerly."""
    if device.type != "cuda":
        return []
    done = []
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    temporal = getattr(model, "temporal", None)
    if cfg.train.compile and temporal is not None:
        from vldm.models.motion_module import MotionModule
        from vldm.models.temporal import TemporalResBlock, TemporalTransformer

        for layer in temporal.values():
            if isinstance(layer, (TemporalResBlock, TemporalTransformer, MotionModule)):
                layer.compile(dynamic=False)  # one graph per layer and shape: frames and sizes are fixed
        done.append("compile")
    return done

"""VideoLDMUNet: a frozen diffusers image UNet with temporal layers interleaved (paper §3.1).

Three parts, like a diffusers model file:
- `self.unet`: the image UNet's own modules, frozen and never modified;
- `self.temporal`: the temporal layers, a ModuleDict keyed by position (`down1_res0`, `mid_attn0`,
  `up2_attn1`); each knows its resolution level and is called as `layer(x, ctx)`;
- `self.conditioning`: the video model's extra inputs (`cond_encoder` for prediction / interpolation
  masks, `extra_in` channels, `class_embed`, `cond_<name>` scalar embeddings).
`temporal` and `conditioning` are the trainable parameters. The forward pass builds one `ForwardContext`,
re-walks the image UNet's blocks (diffusers' block classes for SD-1.x/2.x and tiny UNets) and applies a
temporal layer after every ResNet block and every spatial transformer.

Image mode (`image_only=True`, one frame, or every sample flagged by `image_only_indicator`) is exactly the
image UNet: the temporal layers and every conditioning module are skipped.

Temporal checkpoint format 2 (`temporal.safetensors`): the model's own parameter names (`temporal.*`,
`conditioning.*`); `temporal_config.json` holds the architecture options only. Format 1 (flat names, the
conditioning modules among the temporal layers, vldm's own GEGLU feed-forward) still loads:
`upgrade_temporal_state_dict` maps its keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from vldm.config.core import from_dict, to_dict
from vldm.config.model import RUNTIME_OPTIONS, TemporalOptions
from vldm.io import atomic_path, atomic_write_text
from vldm.models import attention as attention_dispatch
from vldm.models.attention import SpatialAttnProcessor
from vldm.models.temporal import (
    ForwardContext,
    ScalarEmbedding,
    TemporalAttention,
    TemporalCondEncoder,
    TemporalResBlock,
    TemporalTransformer,
)

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
TEMPORAL_FORMAT = 2
CONDITIONING_KEYS = re.compile(r"^(cond_encoder|extra_in|class_embed|cond_[A-Za-z0-9_]+)\.")
# diffusers' processors the backend may replace; anything else was set by the user and is kept
_DEFAULT_PROCESSORS = (AttnProcessor, AttnProcessor2_0, SpatialAttnProcessor)
WEIGHTS_NAME = "temporal.safetensors"
CONFIG_NAME = "temporal_config.json"


def _unet_shape(cfg: dict) -> dict:
    """The part of an image UNet config that temporal weights depend on (checked on load)."""
    keys = (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "cross_attention_dim",
        "attention_head_dim",
        "num_attention_heads",
        "norm_num_groups",
        "transformer_layers_per_block",
    )
    out = {}
    for k in keys:
        v = cfg.get(k)
        out[k] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _clean_unet_config(cfg: Any) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")}


def architecture_options(options: dict) -> dict:
    """`options` without the runtime ones (kernel choice, checkpointing): those belong to a run, not to weights."""
    return {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}


def upgrade_temporal_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format-1 temporal weights (flat keys, GEGLUFeedForward) -> format 2 (`temporal.*`, `conditioning.*`,
    diffusers' FeedForward). Format-2 dicts are returned unchanged."""
    if all(k.startswith(("temporal.", "conditioning.")) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if CONDITIONING_KEYS.match(k):
            out["conditioning." + k] = v
            continue
        # GEGLUFeedForward(proj_in, proj_out) -> FeedForward(net.0.proj, net.2), same maths
        k = re.sub(r"\.(ff_in|ff)\.proj_in\.", r".\1.net.0.proj.", k)
        k = re.sub(r"\.(ff_in|ff)\.proj_out\.", r".\1.net.2.", k)
        out["temporal." + k] = v
    return out


class VideoLDMUNet(ModelMixin, ConfigMixin):
    """Video UNet = frozen image UNet + trainable temporal layers and conditioning modules.

    Build one with `VideoLDMUNet.from_unet2d(unet2d, **temporal_options)`; the full model round-trips
    through `save_pretrained`/`from_pretrained`, the trainable part alone through
    `save_temporal`/`load_temporal`.
    """

    config_name = "config.json"
    ignore_for_config = ["unet2d"]
    _supports_gradient_checkpointing = False  # our own per-block checkpointing, see TemporalOptions

    @register_to_config
    def __init__(
        self, unet_config: dict, temporal_options: dict | None = None, unet2d: UNet2DConditionModel | None = None
    ):
        super().__init__()
        # runtime options in a saved config (format 1 wrote them) are ignored: set them with set_attention_backend /
        # set_gradient_checkpointing for the machine at hand
        options = architecture_options(dict(temporal_options or {}))
        self.opts: TemporalOptions = from_dict(TemporalOptions, options, prefix="model.temporal")
        self.unet = unet2d if unet2d is not None else UNet2DConditionModel.from_config(unet_config)
        self.unet.requires_grad_(False)
        self._check_supported()
        self.temporal = nn.ModuleDict(self._build_temporal())
        self.conditioning = nn.ModuleDict(self._build_conditioning())
        self.freeze_spatial()
        self.set_attention_backend(self.opts.attention_backend, self.opts.attn_max_batch)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, **options: Any) -> VideoLDMUNet:
        """Wrap `unet2d` (its weights are used as they are, not copied) with new temporal layers.

        Runtime options among `options` (attention_backend, attn_max_batch, gradient_checkpointing) are applied
        to this instance; they are not part of its config and are not saved with the weights.
        """
        opts = options.pop("temporal", None)
        if isinstance(opts, TemporalOptions):
            opts = to_dict(opts)
        opts = {**(opts or {}), **options}
        model = cls(
            unet_config=_clean_unet_config(unet2d.config), temporal_options=architecture_options(opts), unet2d=unet2d
        )
        defaults = TemporalOptions()
        model.set_attention_backend(
            opts.get("attention_backend", defaults.attention_backend), opts.get("attn_max_batch")
        )
        model.set_gradient_checkpointing(opts.get("gradient_checkpointing", defaults.gradient_checkpointing))
        return model

    def _check_supported(self) -> None:
        cfg = self.unet.config
        for b in self.unet.down_blocks:
            if type(b).__name__ not in SUPPORTED_DOWN:
                raise NotImplementedError(
                    f"down block {type(b).__name__} is not supported (supported: {SUPPORTED_DOWN})"
                )
        for b in self.unet.up_blocks:
            if type(b).__name__ not in SUPPORTED_UP:
                raise NotImplementedError(f"up block {type(b).__name__} is not supported (supported: {SUPPORTED_UP})")
        if self.unet.mid_block is not None and type(self.unet.mid_block).__name__ not in SUPPORTED_MID:
            raise NotImplementedError(f"mid block {type(self.unet.mid_block).__name__} is not supported")
        if cfg.addition_embed_type is not None or cfg.class_embeddings_concat or cfg.encoder_hid_dim is not None:
            raise NotImplementedError(
                "addition_embed_type / class_embeddings_concat / encoder_hid_dim UNets are not supported"
            )

    def _emb_channels(self) -> int:
        return self.unet.time_embedding.linear_2.out_features

    def _sites(self):
        """(name, kind, level, module) of every spatial ResNet ("res") and transformer ("attn"), in forward order."""
        n = len(self.unet.down_blocks)
        for i, blk in enumerate(self.unet.down_blocks):
            for j, r in enumerate(blk.resnets):
                yield f"down{i}_res{j}", "res", i, r
            for j, tf in enumerate(getattr(blk, "attentions", None) or []):
                yield f"down{i}_attn{j}", "attn", i, tf
        mid = self.unet.mid_block
        if mid is not None:
            for j, r in enumerate(mid.resnets):
                yield f"mid_res{j}", "res", n - 1, r
            for j, tf in enumerate(getattr(mid, "attentions", None) or []):
                yield f"mid_attn{j}", "attn", n - 1, tf
        for i, blk in enumerate(self.unet.up_blocks):
            for j, r in enumerate(blk.resnets):
                yield f"up{i}_res{j}", "res", n - 1 - i, r
            for j, tf in enumerate(getattr(blk, "attentions", None) or []):
                yield f"up{i}_attn{j}", "attn", n - 1 - i, tf

    def _build_temporal(self) -> dict[str, nn.Module]:
        o, cfg = self.opts, self.unet.config
        if o.temporal_block == "animatediff":
            from vldm.models.motion_module import add_motion_modules

            layers: dict[str, nn.Module] = {}
            add_motion_modules(self, layers)  # attention-only AnimateDiff layout, exportable to a MotionAdapter
            return layers
        emb, level_ch = self._emb_channels(), list(cfg.block_out_channels)
        ctx_dim = cfg.cross_attention_dim if o.cross_attention else None
        layers = {}
        for name, kind, level, block in self._sites():
            if kind == "res" and o.res_blocks:
                cond_ch = level_ch[level] if o.temporal_cond_channels else 0
                layers[name] = TemporalResBlock(
                    block.out_channels, emb, o.kernel_size, cfg.norm_num_groups, o.dropout, o.merge_init, cond_ch, level
                )
            elif kind == "attn" and o.attention:
                c = block.config
                layers[name] = TemporalTransformer(
                    c.in_channels,
                    c.num_attention_heads,
                    c.attention_head_dim,
                    ctx_dim,
                    o.ff_mult,
                    o.frame_embedding,
                    o.dropout,
                    o.merge_init,
                    level,
                )
        return layers

    def _build_conditioning(self) -> dict[str, nn.Module]:
        o, emb = self.opts, self._emb_channels()
        mods: dict[str, nn.Module] = {}
        if o.temporal_cond_channels:
            # read by the temporal res blocks' cond_proj (TemporalOptions.validate requires res_blocks)
            mods["cond_encoder"] = TemporalCondEncoder(
                o.temporal_cond_channels, list(self.unet.config.block_out_channels)
            )
        if o.extra_in_channels:
            mods["extra_in"] = nn.Conv2d(o.extra_in_channels, self.unet.conv_in.out_channels, 3, padding=1, bias=False)
            nn.init.zeros_(mods["extra_in"].weight)
        if o.num_class_labels:
            # one extra row: the "no label" class used for label dropout / guidance
            mods["class_embed"] = nn.Embedding(o.num_class_labels + 1, emb)
            nn.init.zeros_(mods["class_embed"].weight)
        for name in o.scalar_conds:
            mods[f"cond_{name}"] = ScalarEmbedding(emb)
        return mods

    # ------------------------------------------------------------------ runtime options (not saved)
    def set_attention_backend(self, backend: str, max_batch: int | None = None) -> None:
        """Route temporal and spatial attention through `vldm.models.attention` with this backend.

        Spatial attention processors the user set (IP-Adapter, custom ones) are kept: only diffusers' default
        processors (and ours) are replaced.
        """
        max_batch = max_batch or self.opts.attn_max_batch
        self.opts = dataclasses.replace(self.opts, attention_backend=backend, attn_max_batch=max_batch)
        for m in self.temporal.modules():
            if isinstance(m, TemporalAttention):
                m.backend, m.max_batch = backend, max_batch
        use_ours = backend in ("flash", "math") or (
            backend == "auto" and attention_dispatch._flash_attn_func is not None
        )
        procs = {}
        for name, proc in self.unet.attn_processors.items():
            if type(proc) not in _DEFAULT_PROCESSORS:
                procs[name] = proc
            elif use_ours:
                procs[name] = SpatialAttnProcessor(backend, max_batch)
            else:
                # diffusers' SDPA processor: on a GPU torch dispatches it to its own flash kernel
                procs[name] = AttnProcessor2_0()
        self.unet.set_attn_processor(procs)

    def set_gradient_checkpointing(self, mode: str) -> None:
        if mode not in ("off", "temporal", "block"):
            raise ValueError(f"gradient_checkpointing must be off|temporal|block, got {mode!r}")
        self.opts = dataclasses.replace(self.opts, gradient_checkpointing=mode)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: temporal layers and conditioning modules."""
        return list(self.temporal.parameters()) + list(self.conditioning.parameters())

    def spatial_parameters(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    def freeze_spatial(self) -> None:
        self.unet.requires_grad_(False)
        self.temporal.requires_grad_(True)
        self.conditioning.requires_grad_(True)

    # ------------------------------------------------------------------ forward
    def _checkpointed(self, level: str, fn, *args):
        """fn(*args), under activation checkpointing when training at this checkpointing level (non-reentrant: the
        tensors inside `args`, the context's too, get their gradients)."""
        if self.training and self.opts.gradient_checkpointing == level and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _temporal(self, name: str, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Temporal layer `name` (when the model has one and the batch is video) on the (b f) c h w tensor `x`."""
        if ctx.skip_temporal or name not in self.temporal:
            return x
        return self._checkpointed("temporal", self.temporal[name], x, ctx)

    def _down(self, i: int, x: torch.Tensor, ctx: ForwardContext):
        blk = self.unet.down_blocks[i]
        outs = ()
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            x = resnet(x, ctx.spatial_temb)
            x = self._temporal(f"down{i}_res{j}", x, ctx)
            if attns is not None:
                x = attns[j](x, encoder_hidden_states=ctx.spatial_encoder_hidden_states, return_dict=False)[0]
                x = self._temporal(f"down{i}_attn{j}", x, ctx)
            outs += (x,)
        if blk.downsamplers is not None:
            for d in blk.downsamplers:
                x = d(x)
            outs += (x,)
        return x, outs

    def _mid(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mid = self.unet.mid_block
        x = mid.resnets[0](x, ctx.spatial_temb)
        x = self._temporal("mid_res0", x, ctx)
        attns = getattr(mid, "attentions", None) or [None] * (len(mid.resnets) - 1)
        for j, (tf, resnet) in enumerate(zip(attns, mid.resnets[1:])):
            if tf is not None:
                x = tf(x, encoder_hidden_states=ctx.spatial_encoder_hidden_states, return_dict=False)[0]
                x = self._temporal(f"mid_attn{j}", x, ctx)
            x = resnet(x, ctx.spatial_temb)
            x = self._temporal(f"mid_res{j + 1}", x, ctx)
        return x

    def _up(self, i: int, x: torch.Tensor, skips: tuple, upsample_size, ctx: ForwardContext) -> torch.Tensor:
        blk = self.unet.up_blocks[i]
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            x = torch.cat([x, skips[-1 - j]], dim=1)  # skips are consumed last-first
            x = resnet(x, ctx.spatial_temb)
            x = self._temporal(f"up{i}_res{j}", x, ctx)
            if attns is not None:
                x = attns[j](x, encoder_hidden_states=ctx.spatial_encoder_hidden_states, return_dict=False)[0]
                x = self._temporal(f"up{i}_attn{j}", x, ctx)
        if blk.upsamplers is not None:
            for u in blk.upsamplers:
                x = u(x, upsample_size)
        return x

    def _conditioning_embedding(
        self, b: int, class_labels: torch.Tensor | None, conditions: dict[str, torch.Tensor] | None, like: torch.Tensor
    ) -> torch.Tensor | None:
        """(b, e) sum of the class-label and scalar-condition embeddings, None when there is none."""
        dev, parts = like.device, []
        if class_labels is not None:
            if "class_embed" not in self.conditioning:
                raise KeyError("class_labels given but the model has no class embedding (temporal.num_class_labels=0)")
            parts.append(self.conditioning["class_embed"](class_labels.long().to(dev)))
        for name, value in (conditions or {}).items():
            key = f"cond_{name}"
            if key not in self.conditioning:
                raise KeyError(f"unknown condition {name!r}; model has {list(self.opts.scalar_conds)}")
            parts.append(self.conditioning[key](torch.as_tensor(value, device=dev).expand(b)))
        if not parts:
            return None
        out = torch.zeros(b, like.shape[-1], device=dev, dtype=like.dtype)
        for p in parts:
            out = out + p.to(like.dtype)
        return out

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        temporal_encoder_hidden_states: torch.Tensor | None = None,
        image_only_indicator: torch.Tensor | None = None,
        image_only: bool = False,
        class_labels: torch.Tensor | None = None,
        conditions: dict[str, torch.Tensor] | None = None,
        temporal_cond: torch.Tensor | None = None,
        attn_band: int | None = None,
        unet_class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for a batch of videos.

        sample: (b, c, f, h, w) latents; c = image UNet in_channels + temporal.extra_in_channels.
        timestep: scalar or (b,). encoder_hidden_states: (b, l, d), one text per video (not per frame).
        temporal_encoder_hidden_states: text for the temporal layers when the spatial layers use a
            personalised text encoder (paper §4.2); defaults to encoder_hidden_states.
        image_only_indicator: (b,) bool, True = frames are independent images: a = 1 and no conditioning module
            contributes, so those samples get the image UNet's output. `image_only=True` or f == 1 sets it for
            the whole batch and skips the temporal layers and conditioning modules.
        class_labels: (b,) ints for temporal.num_class_labels (value num_class_labels = no label).
        conditions: {name: (b,) float} for temporal.scalar_conds (fps, noise level, ...).
        temporal_cond: (b, temporal_cond_channels, f, h, w) mask + masked latents (prediction models).
        attn_band: limit temporal self-attention to a window of this many frames (long sequences).
        unet_class_labels: (b,) labels for the image UNet's own class embedding (e.g. SD x4 noise level).
        """
        b, c, f, h, w = sample.shape
        dev, dtype = sample.device, sample.dtype
        if image_only_indicator is None:
            image_only_indicator = torch.zeros(b, dtype=torch.bool, device=dev)
        image_only_indicator = image_only_indicator.to(device=dev, dtype=torch.bool)
        if image_only or f == 1:
            image_only_indicator = torch.ones_like(image_only_indicator)
        skip_temporal = bool(image_only_indicator.all())
        # conditioning modules feed shared inputs (embedding, conv_in): zero them for image samples so image mode
        # stays the image UNet once they are trained
        video_rows = None if skip_temporal else (~image_only_indicator).to(dtype)

        # contiguous: a channels-last-strided input (what the VAE encoder returns on CPU) makes the
        # backward of the frozen convs segfault in torch 2.13 CPU builds
        x = rearrange(sample, "b c f h w -> (b f) c h w").contiguous()
        unet_in = self.unet.config.in_channels
        x, extra = x[:, :unet_in], x[:, unet_in:]

        # 1. timestep embedding: one per video, repeated per frame for the spatial layers
        t = torch.as_tensor(timestep, device=dev)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.unet.time_embedding(self.unet.get_time_embed(sample=x, timestep=repeat(t, "b -> (b f)", f=f)))
        if unet_class_labels is not None:
            labels = repeat(unet_class_labels, "b -> (b f)", f=f)
            emb = emb + self.unet.get_class_embed(sample=x, class_labels=labels).to(emb.dtype)
        if video_rows is not None:
            cond_emb = self._conditioning_embedding(b, class_labels, conditions, emb)
            if cond_emb is not None:
                emb = emb + repeat(cond_emb * video_rows[:, None], "b e -> (b f) e", f=f)
        if self.unet.time_embed_act is not None:
            emb = self.unet.time_embed_act(emb)

        cond_features = None
        if temporal_cond is not None and "cond_encoder" in self.conditioning and not skip_temporal:
            cond_features = tuple(self.conditioning["cond_encoder"](temporal_cond.to(dtype)))
        ctx = ForwardContext(
            num_frames=f,
            image_only=image_only_indicator,
            spatial_temb=emb,
            spatial_encoder_hidden_states=repeat(encoder_hidden_states, "b l d -> (b f) l d", f=f),
            temb=emb[::f],  # identical across a video's frames
            encoder_hidden_states=encoder_hidden_states
            if temporal_encoder_hidden_states is None
            else temporal_encoder_hidden_states,
            cond_features=cond_features,
            attn_band=attn_band,
            skip_temporal=skip_temporal,
        )

        # 2. in
        x = self.unet.conv_in(x)
        if extra.shape[1] and video_rows is not None:
            x = x + self.conditioning["extra_in"](extra) * repeat(video_rows, "b -> (b f) 1 1 1", f=f)

        # 3. down / mid / up, each block optionally checkpointed as a whole
        up_factor = 2**self.unet.num_upsamplers
        forward_upsample_size = h % up_factor != 0 or w % up_factor != 0
        skips: tuple = (x,)
        for i in range(len(self.unet.down_blocks)):
            x, outs = self._checkpointed("block", self._down, i, x, ctx)
            skips += outs
        if self.unet.mid_block is not None:
            x = self._checkpointed("block", self._mid, x, ctx)
        for i, blk in enumerate(self.unet.up_blocks):
            n = len(blk.resnets)
            res, skips = skips[-n:], skips[:-n]
            last = i == len(self.unet.up_blocks) - 1
            upsample_size = skips[-1].shape[2:] if (not last and forward_upsample_size) else None
            x = self._checkpointed("block", self._up, i, x, res, upsample_size, ctx)

        # 4. out
        if self.unet.conv_norm_out is not None:
            x = self.unet.conv_act(self.unet.conv_norm_out(x))
        x = self.unet.conv_out(x)
        return rearrange(x, "(b f) c h w -> b c f h w", f=f)

    # ------------------------------------------------------------------ trainable weights alone
    def temporal_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights under their parameter names (`temporal.*`, `conditioning.*`): format 2."""
        sd = {f"temporal.{k}": v for k, v in self.temporal.state_dict().items()}
        sd.update({f"conditioning.{k}": v for k, v in self.conditioning.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def load_temporal_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True, source: str = "") -> None:
        """Copy format-1 or format-2 trainable weights into the existing parameters (device and dtype kept)."""
        sd = upgrade_temporal_state_dict(sd)
        parts = {"temporal": self.temporal, "conditioning": self.conditioning}
        missing, unexpected = [], [k for k in sd if k.split(".", 1)[0] not in parts]
        for name, module in parts.items():
            sub = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
            m, u = module.load_state_dict(sub, strict=False)
            missing += [f"{name}.{k}" for k in m]
            unexpected += [f"{name}.{k}" for k in u]
        if strict and (missing or unexpected):
            raise ValueError(
                f"temporal weights {source} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def temporal_config(self) -> dict:
        return {
            "format_version": TEMPORAL_FORMAT,
            "temporal": architecture_options(to_dict(self.opts)),
            "base_unet_shape": _unet_shape(self.unet.config),
            "num_parameters": sum(p.numel() for p in self.temporal_parameters()),
        }

    def save_temporal(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `temporal.safetensors` + `temporal_config.json` (atomically) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = upgrade_temporal_state_dict(state_dict) if state_dict is not None else self.temporal_state_dict()
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
        atomic_write_text(d / CONFIG_NAME, json.dumps(self.temporal_config(), indent=2))
        return d

    def load_temporal(self, directory_or_file: str | Path, strict: bool = True) -> None:
        """Load trainable weights saved by `save_temporal` (format 1 or 2, or any compatible safetensors file)."""
        p = Path(directory_or_file)
        weights = p / WEIGHTS_NAME if p.is_dir() else p
        cfg_path = weights.parent / CONFIG_NAME
        if cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            mine = _unet_shape(self.unet.config)
            diff = {
                k: (saved["base_unet_shape"].get(k), v) for k, v in mine.items() if saved["base_unet_shape"].get(k) != v
            }
            if diff:
                raise ValueError(
                    f"temporal weights in {p} were trained on a different UNet shape: {diff} (saved, this)"
                )
        self.load_temporal_state_dict(load_file(str(weights)), strict=strict, source=str(weights))

    @classmethod
    def from_unet2d_and_temporal(cls, unet2d: UNet2DConditionModel, directory: str | Path) -> VideoLDMUNet:
        """Personalised text-to-video (paper §4.2): trained temporal layers onto another image UNet of the same
        shape. Runtime options a format-1 config holds are not re-applied (defaults: auto backend, no checkpointing)."""
        cfg = json.loads((Path(directory) / CONFIG_NAME).read_text())
        model = cls.from_unet2d(unet2d, **architecture_options(cfg["temporal"]))
        model.load_temporal(directory)
        return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

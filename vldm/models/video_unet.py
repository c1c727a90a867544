"""VideoLDMUNet: a frozen diffusers image UNet with temporal layers interleaved (paper §3.1).

The spatial weights are the image UNet's own modules, kept under `self.unet` and never modified;
the temporal layers live under `self.temporal` (a flat ModuleDict keyed by position, e.g.
`down1_res0`, `mid_attn0`, `up2_attn1`) and are the only trainable parameters. The forward pass
re-walks the image UNet's blocks (diffusers' block classes for SD-1.x/2.x and tiny UNets) and inserts
a temporal layer after every ResNet block and every spatial transformer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from vldm.config.core import from_dict, to_dict
from vldm.config.model import TemporalOptions
from vldm.io import atomic_path, atomic_write_text
from vldm.models.attention import SpatialAttnProcessor
from vldm.models.temporal import (
    ScalarEmbedding,
    TemporalAttention,
    TemporalCondEncoder,
    TemporalResBlock,
    TemporalTransformer,
)

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
TEMPORAL_FORMAT = 1
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


class VideoLDMUNet(ModelMixin, ConfigMixin):
    """Video UNet = frozen image UNet + trainable temporal layers.

    Build one with `VideoLDMUNet.from_unet2d(unet2d, **temporal_options)`; the full model round-trips
    through `save_pretrained`/`from_pretrained`, the temporal layers alone through
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
        self.opts: TemporalOptions = from_dict(TemporalOptions, temporal_options or {}, prefix="model.temporal")
        self.unet = unet2d if unet2d is not None else UNet2DConditionModel.from_config(unet_config)
        self.unet.requires_grad_(False)
        self._check_supported()
        self.temporal = nn.ModuleDict()
        self._build_temporal()
        self.temporal.requires_grad_(True)
        self.set_attention_backend(self.opts.attention_backend, self.opts.attn_max_batch)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, **options: Any) -> VideoLDMUNet:
        """Wrap `unet2d` (its weights are used as they are, not copied) with new temporal layers."""
        opts = options.pop("temporal", None)
        if isinstance(opts, TemporalOptions):
            opts = to_dict(opts)
        opts = {**(opts or {}), **options}
        return cls(unet_config=_clean_unet_config(unet2d.config), temporal_options=opts, unet2d=unet2d)

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

    def _build_temporal(self) -> None:
        o, cfg = self.opts, self.unet.config
        emb = self._emb_channels()
        groups = cfg.norm_num_groups
        ctx_dim = cfg.cross_attention_dim if o.cross_attention else None
        level_ch = list(cfg.block_out_channels)
        cond_ch = {}  # resolution level -> encoder channels, when a temporal condition exists
        if o.temporal_cond_channels:
            self.temporal["cond_encoder"] = TemporalCondEncoder(o.temporal_cond_channels, level_ch)
            cond_ch = dict(enumerate(level_ch))

        def res(name: str, ch: int, level: int) -> None:
            if o.res_blocks:
                self.temporal[name] = TemporalResBlock(
                    ch, emb, o.kernel_size, groups, o.dropout, o.merge_init, cond_ch.get(level, 0)
                )

        def attn(name: str, tf: nn.Module) -> None:
            if o.attention:
                heads, head_dim = tf.config.num_attention_heads, tf.config.attention_head_dim
                self.temporal[name] = TemporalTransformer(
                    tf.config.in_channels,
                    heads,
                    head_dim,
                    ctx_dim,
                    o.ff_mult,
                    o.frame_embedding,
                    o.dropout,
                    o.merge_init,
                )

        n = len(self.unet.down_blocks)
        if o.temporal_block == "animatediff":
            from vldm.models.motion_module import add_motion_modules

            add_motion_modules(self)  # attention-only AnimateDiff layout, exportable to a MotionAdapter
        for i, blk in enumerate(self.unet.down_blocks if o.temporal_block == "vldm" else []):
            for j, r in enumerate(blk.resnets):
                res(f"down{i}_res{j}", r.out_channels, i)
            for j, tf in enumerate(getattr(blk, "attentions", [])):
                attn(f"down{i}_attn{j}", tf)
        mid = self.unet.mid_block
        if mid is not None and o.temporal_block == "vldm":
            for j, r in enumerate(mid.resnets):
                res(f"mid_res{j}", r.out_channels, n - 1)
            for j, tf in enumerate(getattr(mid, "attentions", [])):
                attn(f"mid_attn{j}", tf)
        for i, blk in enumerate(self.unet.up_blocks if o.temporal_block == "vldm" else []):
            for j, r in enumerate(blk.resnets):
                res(f"up{i}_res{j}", r.out_channels, n - 1 - i)
            for j, tf in enumerate(getattr(blk, "attentions", [])):
                attn(f"up{i}_attn{j}", tf)
        if o.extra_in_channels:
            self.temporal["extra_in"] = nn.Conv2d(
                o.extra_in_channels, self.unet.conv_in.out_channels, 3, padding=1, bias=False
            )
            nn.init.zeros_(self.temporal["extra_in"].weight)
        if o.num_class_labels:
            # one extra row: the "no label" class used for label dropout / guidance
            self.temporal["class_embed"] = nn.Embedding(o.num_class_labels + 1, emb)
            nn.init.zeros_(self.temporal["class_embed"].weight)
        for name in o.scalar_conds:
            self.temporal[f"cond_{name}"] = ScalarEmbedding(emb)

    # ------------------------------------------------------------------ options
    def set_attention_backend(self, backend: str, max_batch: int | None = None) -> None:
        """Route temporal and spatial attention through `vldm.models.attention` with this backend."""
        max_batch = max_batch or self.opts.attn_max_batch
        self.opts = dataclasses.replace(self.opts, attention_backend=backend, attn_max_batch=max_batch)
        for m in self.temporal.modules():
            if isinstance(m, TemporalAttention):
                m.backend, m.max_batch = backend, max_batch
        from vldm.models.attention import _flash_attn_func

        if backend in ("flash", "math") or (backend == "auto" and _flash_attn_func is not None):
            self.unet.set_attn_processor(SpatialAttnProcessor(backend, max_batch))
        else:
            # diffusers' SDPA processor: on a GPU torch dispatches it to its own flash kernel
            self.unet.set_attn_processor(AttnProcessor2_0())

    def set_gradient_checkpointing(self, mode: str) -> None:
        if mode not in ("off", "temporal", "block"):
            raise ValueError(f"gradient_checkpointing must be off|temporal|block, got {mode!r}")
        self.opts = dataclasses.replace(self.opts, gradient_checkpointing=mode)

    def temporal_parameters(self) -> list[nn.Parameter]:
        return list(self.temporal.parameters())

    def spatial_parameters(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    def freeze_spatial(self) -> None:
        self.unet.requires_grad_(False)
        self.temporal.requires_grad_(True)

    # ------------------------------------------------------------------ forward
    def _run(self, fn, *args):
        if self.training and self.opts.gradient_checkpointing != "off" and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _temporal(self, name: str, x: torch.Tensor, st: dict) -> torch.Tensor:
        """Apply temporal layer `name` (if any) to the (b f) c h w tensor `x`."""
        if st["skip_temporal"] or name not in self.temporal:
            return x
        layer = self.temporal[name]
        if isinstance(layer, TemporalResBlock):
            cond = st["cond_feats"][st["levels"][name]] if st["cond_feats"] is not None else None
            fn = lambda x: layer(x, st["emb_video"], st["image_only"], st["num_frames"], cond)  # noqa: E731
        else:
            fn = lambda x: layer(x, st["temporal_ctx"], st["image_only"], st["num_frames"], st["attn_band"])  # noqa: E731
        if self.training and self.opts.gradient_checkpointing == "temporal" and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def _down(self, i: int, x: torch.Tensor, st: dict):
        blk = self.unet.down_blocks[i]
        outs = ()
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            x = resnet(x, st["emb"])
            x = self._temporal(f"down{i}_res{j}", x, st)
            if attns is not None:
                x = attns[j](x, encoder_hidden_states=st["ctx"], return_dict=False)[0]
                x = self._temporal(f"down{i}_attn{j}", x, st)
            outs += (x,)
        if blk.downsamplers is not None:
            for d in blk.downsamplers:
                x = d(x)
            outs += (x,)
        return x, outs

    def _mid(self, x: torch.Tensor, st: dict) -> torch.Tensor:
        mid = self.unet.mid_block
        x = mid.resnets[0](x, st["emb"])
        x = self._temporal("mid_res0", x, st)
        attns = getattr(mid, "attentions", None) or [None] * (len(mid.resnets) - 1)
        for j, (tf, resnet) in enumerate(zip(attns, mid.resnets[1:])):
            if tf is not None:
                x = tf(x, encoder_hidden_states=st["ctx"], return_dict=False)[0]
                x = self._temporal(f"mid_attn{j}", x, st)
            x = resnet(x, st["emb"])
            x = self._temporal(f"mid_res{j + 1}", x, st)
        return x

    def _up(self, i: int, x: torch.Tensor, skips: tuple, upsample_size, st: dict) -> torch.Tensor:
        blk = self.unet.up_blocks[i]
        attns = getattr(blk, "attentions", None)
        for j, resnet in enumerate(blk.resnets):
            x = torch.cat([x, skips[-1 - j]], dim=1)
            x = resnet(x, st["emb"])
            x = self._temporal(f"up{i}_res{j}", x, st)
            if attns is not None:
                x = attns[j](x, encoder_hidden_states=st["ctx"], return_dict=False)[0]
                x = self._temporal(f"up{i}_attn{j}", x, st)
        if blk.upsamplers is not None:
            for u in blk.upsamplers:
                x = u(x, upsample_size)
        return x

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
        image_only_indicator: (b,) bool, True = frames are independent images: a = 1, output == image UNet.
            `image_only=True` or f == 1 sets it for the whole batch and skips the temporal layers.
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

        # contiguous: a channels-last-strided input (what the VAE encoder returns on CPU) makes the
        # backward of the frozen convs segfault in torch 2.13 CPU builds
        x = rearrange(sample, "b c f h w -> (b f) c h w").contiguous()
        unet_in = self.unet.config.in_channels
        x, extra = x[:, :unet_in], x[:, unet_in:]

        # 1. timestep embedding: one per video, repeated per frame for the spatial layers
        t = torch.as_tensor(timestep, device=dev)
        t = t.expand(b) if t.ndim == 0 else t
        t_frames = repeat(t, "b -> (b f)", f=f)
        emb = self.unet.time_embedding(self.unet.get_time_embed(sample=x, timestep=t_frames))
        if unet_class_labels is not None:
            emb = emb + self.unet.get_class_embed(
                sample=x, class_labels=repeat(unet_class_labels, "b -> (b f)", f=f)
            ).to(emb.dtype)
        extra_emb = torch.zeros(b, emb.shape[-1], device=dev, dtype=emb.dtype)
        if class_labels is not None:
            extra_emb = extra_emb + self.temporal["class_embed"](class_labels.long()).to(emb.dtype)
        for name, value in (conditions or {}).items():
            key = f"cond_{name}"
            if key not in self.temporal:
                raise KeyError(f"unknown condition {name!r}; model has {list(self.opts.scalar_conds)}")
            extra_emb = extra_emb + self.temporal[key](torch.as_tensor(value, device=dev).expand(b)).to(emb.dtype)
        emb = emb + repeat(extra_emb, "b e -> (b f) e", f=f)
        if self.unet.time_embed_act is not None:
            emb = self.unet.time_embed_act(emb)
        emb_video = emb[::f]  # identical across a video's frames

        st: dict[str, Any] = dict(
            emb=emb,
            emb_video=emb_video,
            num_frames=f,
            image_only=image_only_indicator,
            skip_temporal=skip_temporal,
            attn_band=attn_band,
            ctx=repeat(encoder_hidden_states, "b l d -> (b f) l d", f=f),
            temporal_ctx=encoder_hidden_states
            if temporal_encoder_hidden_states is None
            else temporal_encoder_hidden_states,
            cond_feats=None,
            levels=self._levels(),
        )
        if temporal_cond is not None and "cond_encoder" in self.temporal and not skip_temporal:
            st["cond_feats"] = self.temporal["cond_encoder"](temporal_cond.to(dtype))

        # 2. in
        x = self.unet.conv_in(x)
        if extra.shape[1]:
            x = x + self.temporal["extra_in"](extra)

        # 3. down / mid / up, each block optionally checkpointed as a whole
        up_factor = 2**self.unet.num_upsamplers
        forward_upsample_size = h % up_factor != 0 or w % up_factor != 0
        skips: tuple = (x,)
        for i in range(len(self.unet.down_blocks)):
            x, outs = (
                self._run(lambda x, i=i: self._down(i, x, st), x)
                if self.opts.gradient_checkpointing == "block"
                else self._down(i, x, st)
            )
            skips += outs
        if self.unet.mid_block is not None:
            x = (
                self._run(lambda x: self._mid(x, st), x)
                if self.opts.gradient_checkpointing == "block"
                else self._mid(x, st)
            )
        for i, blk in enumerate(self.unet.up_blocks):
            n = len(blk.resnets)
            res, skips = skips[-n:], skips[:-n]
            upsample_size = (
                skips[-1].shape[2:] if (i < len(self.unet.up_blocks) - 1 and forward_upsample_size) else None
            )
            # skips are consumed last-first inside _up
            if self.opts.gradient_checkpointing == "block":
                x = self._run(lambda x, *r, i=i, us=upsample_size: self._up(i, x, r, us, st), x, *res)
            else:
                x = self._up(i, x, res, upsample_size, st)

        # 4. out
        if self.unet.conv_norm_out is not None:
            x = self.unet.conv_act(self.unet.conv_norm_out(x))
        x = self.unet.conv_out(x)
        return rearrange(x, "(b f) c h w -> b c f h w", f=f)

    def _levels(self) -> dict[str, int]:
        if not hasattr(self, "_level_cache"):
            n = len(self.unet.down_blocks)
            lv = {}
            for name in self.temporal.keys():
                if name.startswith("down"):
                    lv[name] = int(name[4 : name.index("_")])
                elif name.startswith("mid"):
                    lv[name] = n - 1
                elif name.startswith("up"):
                    lv[name] = n - 1 - int(name[2 : name.index("_")])
            self._level_cache = lv
        return self._level_cache

    # ------------------------------------------------------------------ temporal weights alone
    def temporal_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.temporal.state_dict().items()}

    def temporal_config(self) -> dict:
        return {
            "format_version": TEMPORAL_FORMAT,
            "temporal": to_dict(self.opts),
            "base_unet_shape": _unet_shape(self.unet.config),
            "num_parameters": sum(p.numel() for p in self.temporal.parameters()),
        }

    def save_temporal(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `temporal.safetensors` + `temporal_config.json` (atomically) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.temporal_state_dict()
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
        atomic_write_text(d / CONFIG_NAME, json.dumps(self.temporal_config(), indent=2))
        return d

    def load_temporal(self, directory_or_file: str | Path, strict: bool = True) -> None:
        """Load temporal weights saved by `save_temporal` (or any compatible safetensors file)."""
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
        sd = load_file(str(weights))
        missing, unexpected = self.temporal.load_state_dict(sd, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(
                f"temporal weights {weights} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    @classmethod
    def from_unet2d_and_temporal(cls, unet2d: UNet2DConditionModel, directory: str | Path) -> VideoLDMUNet:
        """Personalised text-to-video (paper §4.2): trained temporal layers onto another image UNet of the same
        shape."""
        cfg = json.loads((Path(directory) / CONFIG_NAME).read_text())
        model = cls.from_unet2d(unet2d, **cfg["temporal"])
        model.load_temporal(directory)
        return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

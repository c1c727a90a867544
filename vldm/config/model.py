"""Model section: which image LDM to start from and how the temporal layers are built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_


@dataclass
class UNetSpec:
    """Architecture of an image UNet built from scratch (used when `model.pretrained` is empty).

    The defaults are the tiny CPU model of the embedded demo; an SD-1.x shape is
    block_out_channels=[320,640,1280,1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8.
    """

    in_channels: int = field_(4, "latent channels in")
    out_channels: int = field_(4, "latent channels out")
    sample_size: int = field_(16, "nominal latent size (diffusers config only; any size runs)")
    block_out_channels: tuple[int, ...] = field_((32, 64), "channels per resolution level")
    layers_per_block: int = field_(1, "ResNet blocks per down block (up blocks get one more)")
    down_block_types: tuple[str, ...] = field_(("CrossAttnDownBlock2D", "DownBlock2D"), "diffusers down block classes")
    up_block_types: tuple[str, ...] = field_(("UpBlock2D", "CrossAttnUpBlock2D"), "diffusers up block classes")
    cross_attention_dim: int = field_(32, "text embedding width")
    attention_head_dim: int = field_(8, "diffusers' SD-1 naming: number of heads when num_attention_heads is unset")
    norm_num_groups: int = field_(8, "GroupNorm groups")
    num_class_embeds: int = field_(0, "class-embedding table size inside the image UNet (0 = none)")

    def validate(self) -> None:
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ConfigError("model.unet.down_block_types: needs one entry per block_out_channels level")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ConfigError("model.unet.up_block_types: needs one entry per block_out_channels level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"model.unet.block_out_channels: {c} is not divisible by norm_num_groups")

    def diffusers_kwargs(self) -> dict:
        kw = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            sample_size=self.sample_size,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(self.down_block_types),
            up_block_types=tuple(self.up_block_types),
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )
        if self.num_class_embeds:
            kw["num_class_embeds"] = self.num_class_embeds
        return kw


# how a run executes the layers, not what they are: not saved with the temporal weights, not re-applied on load
RUNTIME_OPTIONS = ("gradient_checkpointing", "attention_backend", "attn_max_batch")


@dataclass
class TemporalOptions:
    """How temporal layers are added to the image UNet (paper §3.1). Saved with the temporal weights, except the
    runtime options (gradient_checkpointing, attention_backend, attn_max_batch)."""

    res_blocks: bool = field_(True, "add a 3D-conv residual block after every spatial ResNet block")
    attention: bool = field_(True, "add a temporal transformer after every spatial transformer")
    kernel_size: int = field_(3, "temporal kernel of the 3D convs: (k,1,1)")
    cross_attention: bool = field_(True, "temporal transformers cross-attend to the text embedding")
    frame_embedding: bool = field_(True, "sinusoidal frame-index embedding through an MLP, added before attention")
    ff_mult: int = field_(4, "feed-forward width multiplier (GEGLU)")
    merge_init: float = field_(0.0, "initial logit m of the merge factor a = sigmoid(m)")
    dropout: float = field_(0.0, "dropout inside temporal layers")
    extra_in_channels: int = field_(0, "extra zero-initialised input channels (e.g. low-res frames, masks)")
    num_class_labels: int = field_(0, "extra class-label embedding added to the timestep embedding (0 = none)")
    scalar_conds: tuple[str, ...] = field_(
        (), "names of scalar conditions (fps, noise_level) embedded and added to the timestep embedding"
    )
    temporal_cond_channels: int = field_(
        0,
        "channels of a (mask, masked latents) condition fed to the temporal layers through a zero-initialised "
        "downsampling encoder",
    )
    temporal_block: Literal["vldm", "animatediff"] = field_(
        "vldm",
        "temporal attention design: vldm = paper §3.1 transformer; animatediff = AnimateDiff motion-module layout "
        "(attention only, needs res_blocks=false), exportable to diffusers' MotionAdapter",
    )
    motion_num_attention_heads: int = field_(
        8, "heads of every animatediff-style temporal layer (head dim = channels / heads)"
    )
    gradient_checkpointing: Literal["off", "temporal", "block"] = field_(
        "off", "activation checkpointing: off, temporal layers only, or every block (spatial + temporal)"
    )
    attention_backend: Literal["auto", "sdpa", "flash", "math"] = field_(
        "auto", "attention kernel: auto = flash-attn on CUDA in fp16/bf16 when installed, else torch SDPA"
    )
    attn_max_batch: int = field_(65535, "largest batch*heads per attention kernel call (pytorch issue 142228)")

    def validate(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"model.temporal.kernel_size: must be odd and >= 1, got {self.kernel_size}")
        if self.attn_max_batch < 1:
            raise ConfigError("model.temporal.attn_max_batch: must be >= 1")
        if self.temporal_block == "animatediff" and self.res_blocks:
            raise ConfigError("model.temporal.temporal_block=animatediff is attention-only: set res_blocks=false")
        if self.temporal_cond_channels and (not self.res_blocks or self.temporal_block != "vldm"):
            # the condition enters through the temporal res blocks' cond_proj: without them it would be ignored
            raise ConfigError(
                "model.temporal.temporal_cond_channels: a temporal condition (prediction / interpolation) needs "
                "model.temporal.res_blocks=true and model.temporal.temporal_block=vldm (it enters through the "
                "temporal res blocks)"
            )


@dataclass
class ModelConfig:
    pretrained: str = field_(
        "",
        "local directory of a diffusers image LDM (unet/, vae/, text_encoder/, tokenizer/, scheduler/); empty = build "
        "from model.unet",
    )
    unet: UNetSpec = field_(default_factory=UNetSpec, help="image UNet architecture when not pretrained")
    temporal: TemporalOptions = field_(default_factory=TemporalOptions, help="temporal layer options")
    pixel_space: bool = field_(
        False,
        "the UNet denoises pixels, no VAE (the driving model's x4 upsampler, paper §3.4): the shards' decoded clips "
        "are its training targets",
    )
    temporal_weights: str = field_(
        "", "initialise temporal layers from this directory (temporal.safetensors + temporal_config.json)"
    )

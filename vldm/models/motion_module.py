"""Attention-only temporal layers in the AnimateDiff motion-module layout (`temporal_block=animatediff`).

The paper's temporal transformer (§3.1) works on the spatial features directly; diffusers'
`AnimateDiffTransformer3D` wraps its attention in GroupNorm -> proj_in ... proj_out -> + residual. The
GroupNorm cannot be undone by any weight choice, so a layer that must export *exactly* to a diffusers
`MotionAdapter` has to have that layout. This module reproduces it with the same parameter names
(`norm`, `proj_in`, `transformer_blocks.k.{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`) plus our
merge factor: out = a * x + (1 - a) * (x + delta) = x + (1 - a) * delta, so (1 - a) folds into
`proj_out` on export (vldm.models.motion_adapter).

Differences from diffusers kept on purpose: attention goes through `vldm.models.attention` (banded
attention for long sequences, chunking past the 65,535 batch limit), and a = 1 for image batches. Like
diffusers (and unlike the original AnimateDiff, which normalises per frame) the GroupNorm spans frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from einops import rearrange

from vldm.models.temporal import ForwardContext, MergeFactor, TemporalAttention, zero_


def motion_positions(num_frames: int, dim: int, device: torch.device) -> torch.Tensor:
    """diffusers' SinusoidalPositionalEmbedding table for positions 0..f-1: (f, dim).

    pe[p, 0::2] = sin(p * w), pe[p, 1::2] = cos(p * w), w = 10000^(-2i/dim).
    """
    div = torch.exp(torch.arange(0, dim, 2, device=device).float() * (-math.log(10000.0) / dim))
    ang = torch.arange(num_frames, device=device).float()[:, None] * div
    pe = torch.zeros(num_frames, dim, device=device)
    pe[..., 0::2] = torch.sin(ang)
    pe[..., 1::2] = torch.cos(ang)
    return pe


class MotionBlock(nn.Module):
    """diffusers' BasicTransformerBlock as AnimateDiff configures it: two self-attentions (positions added
    to the normalised input of both) and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = TemporalAttention(dim, heads, dim // heads, None, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = TemporalAttention(dim, heads, dim // heads, None, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")

    def forward(self, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attn1(self.norm1(h) + pos, mask=mask)
        h = h + self.attn2(self.norm2(h) + pos, mask=mask)
        return h + self.ff(self.norm3(h))


class MotionModule(nn.Module):
    """One AnimateDiff motion module with a merge factor; takes and returns `(b f) c h w`."""

    def __init__(
        self,
        channels: int,
        heads: int,
        groups: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        merge_init: float = 0.0,
        level: int = 0,
    ):
        super().__init__()
        self.level = level
        if channels % heads:
            raise ValueError(f"motion module: {channels} channels are not divisible by {heads} heads")
        self.channels = channels
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([MotionBlock(channels, heads, dropout) for _ in range(num_layers)])
        self.proj_out = zero_(nn.Linear(channels, channels))  # identity at initialisation, as AnimateDiff
        self.merge = MergeFactor(merge_init)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # motion modules have no text cross-attention and no condition input
        num_frames = ctx.num_frames
        _, _, hh, ww = x.shape
        h = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        h = self.norm(h)  # statistics span the frames of a video (diffusers' behaviour)
        h = self.proj_in(rearrange(h, "b c f h w -> (b h w) f c"))
        pos = motion_positions(num_frames, self.channels, x.device).to(h.dtype)
        mask = ctx.band_mask(x.device)
        for blk in self.transformer_blocks:
            h = blk(h, pos, mask)
        delta = rearrange(self.proj_out(h), "(b h w) f c -> (b f) c h w", h=hh, w=ww)
        return self.merge(x, x + delta, ctx.image_only, num_frames)


def motion_module_sites(unet) -> list[tuple[str, int, int]]:
    """(temporal layer name, channels, resolution level) for every place UNetMotionModel puts a motion module.

    Blocks with spatial transformers get one after each transformer (`*_attn{j}`), blocks without
    after each ResNet (`*_res{j}`), the mid block after its transformer.
    """
    sites = []
    n = len(unet.down_blocks)
    for prefix, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, blk in enumerate(blocks):
            has_attn = getattr(blk, "attentions", None) is not None
            level = i if prefix == "down" else n - 1 - i
            for j, r in enumerate(blk.resnets):
                sites.append((f"{prefix}{i}_{'attn' if has_attn else 'res'}{j}", r.out_channels, level))
        if prefix == "down" and unet.mid_block is not None:
            for j, _ in enumerate(getattr(unet.mid_block, "attentions", None) or []):
                sites.append((f"mid_attn{j}", unet.mid_block.resnets[0].out_channels, n - 1))
    return sites


def add_motion_modules(model, layers: dict) -> None:
    """Fill `layers` (the temporal layers of `model`, a VideoLDMUNet) with motion modules at UNetMotionModel's
    positions."""
    o, cfg = model.opts, model.unet.config
    for name, ch, level in motion_module_sites(model.unet):
        layers[name] = MotionModule(
            ch,
            o.motion_num_attention_heads,
            cfg.norm_num_groups,
            dropout=o.dropout,
            merge_init=o.merge_init,
            level=level,
        )

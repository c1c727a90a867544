"""Temporal layers of the Video LDM (paper §3.1): 3D-conv residual blocks and temporal transformers.

Spatial layers see a video as a batch of frames `(b f) c h w`; every temporal layer here takes and
returns that layout and unfolds the frame axis itself. Each layer is merged with the spatial path by
`out = a * z_spatial + (1 - a) * z_temporal`, a = sigmoid(m) per layer, and a = 1 exactly for
samples in image mode.

Identity at initialisation: the last layer of every temporal branch is zero, so z_temporal ==
z_spatial and the video model equals the image model applied frame by frame, whatever a is.

Every temporal layer has one call signature, `layer(x, ctx)`: `ctx` is the `ForwardContext` that
`VideoLDMUNet.forward` builds once per call, and the layer picks what it needs from it. A layer knows its
resolution `level` from construction (the condition features it reads are per level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange, repeat

from vldm.models.attention import attention


@dataclass(frozen=True)
class ForwardContext:
    """Everything the blocks of one `VideoLDMUNet.forward` share, computed once per call.

    The spatial fields are per frame (the image UNet sees `(b f)` images); the temporal ones per video.
    """

    num_frames: int
    image_only: torch.Tensor  # (b,) bool: True = the video's frames are independent images (a = 1)
    spatial_temb: torch.Tensor  # (b f, e) timestep (+ conditioning) embedding for the spatial ResNets
    spatial_encoder_hidden_states: torch.Tensor  # (b f, l, d) text for the spatial transformers
    temb: torch.Tensor  # (b, e) the same embedding once per video, for the temporal res blocks
    encoder_hidden_states: torch.Tensor | None  # (b, l, d) text for temporal cross-attention
    cond_features: tuple[torch.Tensor, ...] | None = None  # per resolution level, from TemporalCondEncoder
    attn_band: int | None = None  # temporal self-attention window in frames (long sequences)
    skip_temporal: bool = False  # every sample is image-only: the temporal layers are not run at all

    def band_mask(self, device: torch.device) -> torch.Tensor | None:
        f, band = self.num_frames, self.attn_band
        return band_mask(f, band, device) if band and band < f else None


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class MergeFactor(nn.Module):
    """Learned scalar blend a = sigmoid(m); a = 1 for samples flagged as images (temporal path skipped)."""

    def __init__(self, init_logit: float = 0.0):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([float(init_logit)]))

    def alpha(self, image_only: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
        a = torch.sigmoid(self.mix_factor).to(dtype)
        # image_only: (b,) bool -> per frame row of the (b f) batch, broadcast over c h w
        a = torch.where(image_only, torch.ones((), dtype=dtype, device=a.device), a)
        return repeat(a, "b -> (b f) 1 1 1", f=num_frames)

    def forward(
        self, spatial: torch.Tensor, temporal: torch.Tensor, image_only: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        a = self.alpha(image_only, num_frames, spatial.dtype)
        if spatial.ndim == 3:
            a = a[..., 0]
        return a * spatial + (1 - a) * temporal


class TemporalResBlock(nn.Module):
    """Residual block of (k,1,1) 3D convolutions with the diffusion timestep embedding (sgm's VideoResBlock)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        kernel_size: int = 3,
        groups: int = 32,
        dropout: float = 0.0,
        merge_init: float = 0.0,
        cond_channels: int = 0,
        level: int = 0,
    ):
        super().__init__()
        self.level = level  # resolution level: which of the condition encoder's outputs this block reads
        pad = (kernel_size // 2, 0, 0)
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=pad)
        self.emb_proj = nn.Linear(emb_channels, channels)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=pad))
        # condition (mask, masked latents) features arrive through a zero 1x1 conv: identity at init
        self.cond_proj = zero_(nn.Conv2d(cond_channels, channels, 1)) if cond_channels else None
        self.merge = MergeFactor(merge_init)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        f = ctx.num_frames
        h = x
        if self.cond_proj is not None and ctx.cond_features is not None:
            h = h + self.cond_proj(ctx.cond_features[self.level])
        h = rearrange(h, "(b f) c h w -> b c f h w", f=f)
        skip = h
        h = self.conv1(F.silu(self.norm1(h)))
        h = h + self.emb_proj(F.silu(ctx.temb))[:, :, None, None, None]  # temb is per video: (b, e)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        temporal = rearrange(skip + h, "b c f h w -> (b f) c h w")
        return self.merge(x, temporal, ctx.image_only, f)


def geglu_feed_forward(dim: int, mult: int, dropout: float) -> FeedForward:
    """diffusers' GEGLU feed-forward (`net.0.proj`, `net.2`), its output projection zero: identity branch at init."""
    ff = FeedForward(dim, dim, mult=mult, dropout=dropout, activation_fn="geglu")
    zero_(ff.net[2])
    return ff


class TemporalAttention(nn.Module):
    """Multi-head attention whose kernel is chosen by `vldm.models.attention`."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.backend = "auto"
        self.max_batch = 65535

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=self.heads) for t in (q, k, v))
        out = attention(q, k, v, backend=self.backend, max_batch=self.max_batch, mask=mask)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


def frame_index_embedding(num_frames: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal embedding of the frame positions 0..f-1: (f, dim)."""
    idx = torch.arange(num_frames, device=device)
    return get_timestep_embedding(idx, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def band_mask(num_frames: int, band: int, device: torch.device) -> torch.Tensor:
    """Bool (f, f) mask letting frame i attend to the `band` frames i - band // 2 .. i + (band - 1) // 2.

    Exactly `band` frames away from the ends: an odd band is centred, an even one reaches one frame further
    into the past than into the future (a symmetric |i - j| <= band // 2 would give band + 1 frames)."""
    idx = torch.arange(num_frames, device=device)
    d = idx[None, :] - idx[:, None]  # j - i
    return (d >= -(band // 2)) & (d <= (band - 1) // 2)


class TemporalTransformer(nn.Module):
    """Temporal transformer (paper §3.1): FF in, self-attention over frames, text cross-attention, FF.

    Tokens are the pixels of every frame, grouped so attention runs along the frame axis:
    `(b f) c h w -> (b h w) f c`. Cross-attention queries are independent of each other, so it runs on
    `b (h w f) c` against the per-video text embedding: no copy of the text per pixel.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int | None,
        ff_mult: int = 4,
        frame_embedding: bool = True,
        dropout: float = 0.0,
        merge_init: float = 0.0,
        level: int = 0,
    ):
        super().__init__()
        if heads * head_dim <= 0:
            raise ValueError(f"temporal transformer: {heads} heads of dim {head_dim}")
        self.level = level
        self.channels = channels
        if frame_embedding:
            self.frame_embed = nn.Sequential(
                nn.Linear(channels, channels * 4), nn.SiLU(), nn.Linear(channels * 4, channels)
            )
            zero_(self.frame_embed[2])
        else:
            self.frame_embed = None
        self.norm_in = nn.LayerNorm(channels)
        self.ff_in = geglu_feed_forward(channels, ff_mult, dropout)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = TemporalAttention(channels, heads, head_dim, None, dropout)
        zero_(self.attn1.to_out[0])
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(channels)
            self.attn2 = TemporalAttention(channels, heads, head_dim, context_dim, dropout)
            zero_(self.attn2.to_out[0])
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(channels)
        self.ff = geglu_feed_forward(channels, ff_mult, dropout)
        self.merge = MergeFactor(merge_init)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_frames, context = ctx.num_frames, ctx.encoder_hidden_states
        bf, c, hh, ww = x.shape
        b = bf // num_frames
        h = rearrange(x, "(b f) c h w -> (b h w) f c", f=num_frames)
        if self.frame_embed is not None:
            # (f, c): the same positions for every token sequence
            h = h + self.frame_embed(frame_index_embedding(num_frames, c, x.device).to(h.dtype))
        h = h + self.ff_in(self.norm_in(h))
        h = h + self.attn1(self.norm1(h), mask=ctx.band_mask(x.device))
        if self.attn2 is not None and context is not None:
            q = rearrange(h, "(b n) f c -> b (n f) c", b=b)
            q = q + self.attn2(self.norm2(q), context=context)
            h = rearrange(q, "b (n f) c -> (b n) f c", f=num_frames)
        h = h + self.ff(self.norm3(h))
        temporal = rearrange(h, "(b h w) f c -> (b f) c h w", b=b, h=hh, w=ww)
        return self.merge(x, temporal, ctx.image_only, num_frames)


class ScalarEmbedding(nn.Module):
    """A scalar condition (fps, noise level, ...) -> sinusoid -> MLP, zero at init; added to the timestep embedding."""

    def __init__(self, emb_channels: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        zero_(self.mlp[2])

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        emb = get_timestep_embedding(
            value.reshape(-1).float(), self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TemporalCondEncoder(nn.Module):
    """Learned downsampling of a (mask, masked latents) condition to every resolution level (paper §3.2).

    Per-frame 2D convs; level l has stride 2**l, the same rounding as diffusers' Downsample2D. Its
    outputs reach the temporal res blocks through their zero-initialised `cond_proj`.
    """

    def __init__(self, in_channels: int, level_channels: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, level_channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        prev = level_channels[0]
        for i, c in enumerate(level_channels):
            stride = 1 if i == 0 else 2
            self.levels.append(nn.Sequential(nn.SiLU(), nn.Conv2d(prev, c, 3, stride=stride, padding=1)))
            prev = c

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv_in(rearrange(cond, "b c f h w -> (b f) c h w"))
        feats = []
        for level in self.levels:
            h = level(h)
            feats.append(h)
        return feats

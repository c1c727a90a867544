"""The video decoder (paper §3.1.1): the image autoencoder's decoder with temporal layers, encoder untouched.

`VideoDecoder.from_vae(vae)` copies an SD `AutoencoderKL`'s `post_quant_conv` and decoder and adds, after
every decoder ResNet, a residual block of (k,1,1) 3D convs merged by a learned factor, plus a (3,1,1)
conv on the output frames: the layout of diffusers' `AutoencoderKLTemporalDecoder` (SVD), whose names
the temporal parts reuse (`temporal_res_block.{norm1,conv1,norm2,conv2}`, `time_conv_out`).

Why not diffusers' class itself: its `TemporalDecoder` hard-codes 32 GroupNorm groups and one mid-block
ResNet per `layers_per_block`, and has no `post_quant_conv` (folding it into `conv_in` is inexact at
the border, where the 3x3 conv's zero padding meets the 1x1 conv's bias), so it only maps SD-shaped
VAEs and never exactly. This class maps any `AutoencoderKL` exactly: at initialisation the last conv of
every temporal block is zero and `time_conv_out` is the identity kernel, so the video decoder equals the
image decoder frame by frame (tested bit for bit). The encoder is not part of this model: latents stay
those of the image autoencoder, so the image LDM keeps working on them (paper §3.1.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from vldm.models.temporal import MergeFactor, zero_
from vldm.models.windows import crossfade

DECODER_DIR = "video_decoder"  # subfolder of a decoder checkpoint (stage=decoder) holding this model


class DecoderTemporalBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d(k,1,1) twice, residual, merged with the spatial features by a = sigmoid(m)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6, kernel_size: int = 3, merge_init: float = 0.0):
        super().__init__()
        pad = (kernel_size // 2, 0, 0)
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=pad)
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = zero_(nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=pad))
        self.merge = MergeFactor(merge_init)

    def forward(self, x: torch.Tensor, num_frames: int, image_only: torch.Tensor) -> torch.Tensor:
        h = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        h = h + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(h))))))
        return self.merge(x, rearrange(h, "b c f h w -> (b f) c h w"), image_only, num_frames)


def _identity_time_conv(channels: int) -> nn.Conv3d:
    conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    with torch.no_grad():
        conv.weight[:, :, 1, 0, 0] = torch.eye(channels)
    return conv


class VideoDecoder(ModelMixin, ConfigMixin):
    """Latents (b, c, f, h, w) -> pixels (b, 3, f, H, W); `image_only=True` is the image decoder exactly."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, vae_config: dict, kernel_size: int = 3, merge_init: float = 0.0):
        super().__init__()
        vae = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder  # diffusers' spatial Decoder, weights copied by from_vae
        groups = vae_config.get("norm_num_groups", 32)
        self.temporal = nn.ModuleDict()
        for name, ch in self._sites():
            self.temporal[name] = DecoderTemporalBlock(ch, groups, 1e-6, kernel_size, merge_init)
        self.time_conv_out = _identity_time_conv(vae.decoder.conv_out.out_channels)
        self.scaling_factor = float(vae_config.get("scaling_factor", 1.0))
        self.shift_factor = float(vae_config.get("shift_factor") or 0.0)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, **options: Any) -> VideoDecoder:
        """A video decoder equal to `vae`'s decoder (weights copied; the VAE is left as it is)."""
        model = cls(vae_config=dict(vae.config), **options)
        model.decoder.load_state_dict(vae.decoder.state_dict())
        if vae.post_quant_conv is not None:
            model.post_quant_conv.load_state_dict(vae.post_quant_conv.state_dict())
        model.to(vae.device)
        return model if vae.dtype == torch.float32 else model.to(dtype=vae.dtype)

    def _sites(self) -> Iterator[tuple[str, int]]:
        for j, r in enumerate(self.decoder.mid_block.resnets):
            yield f"mid_res{j}", r.out_channels
        for i, blk in enumerate(self.decoder.up_blocks):
            for j, r in enumerate(blk.resnets):
                yield f"up{i}_res{j}", r.out_channels

    # ------------------------------------------------------------------ parameters
    def temporal_parameters(self) -> list[nn.Parameter]:
        return list(self.temporal.parameters()) + list(self.time_conv_out.parameters())

    def spatial_parameters(self) -> list[nn.Parameter]:
        out = list(self.decoder.parameters())
        return out + (list(self.post_quant_conv.parameters()) if self.post_quant_conv is not None else [])

    # ------------------------------------------------------------------ forward
    def _t(self, name: str, x: torch.Tensor, st: dict) -> torch.Tensor:
        if st["skip"]:
            return x
        return self.temporal[name](x, st["f"], st["image_only"])

    def forward(self, latents: torch.Tensor, image_only: bool = False, scaled: bool = True) -> torch.Tensor:
        """(b, c, f, h, w) latents (scaled by the VAE's scaling_factor unless `scaled=False`) -> (b, 3, f, H, W)
        pixels, not clamped (training compares them to the input)."""
        b, _, f = latents.shape[:3]
        z = rearrange(latents, "b c f h w -> (b f) c h w")
        if scaled:
            z = z / self.scaling_factor + self.shift_factor
        skip = image_only or f == 1
        st = {"f": f, "skip": skip, "image_only": torch.full((b,), bool(skip), device=z.device)}
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        dec = self.decoder
        h = dec.conv_in(z)
        mid = dec.mid_block
        h = mid.resnets[0](h, None)
        h = self._t("mid_res0", h, st)
        for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if attn is not None:
                h = attn(h, temb=None)
            h = res(h, None)
            h = self._t(f"mid_res{j + 1}", h, st)
        h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
        for i, blk in enumerate(dec.up_blocks):
            for j, res in enumerate(blk.resnets):
                h = res(h, None)
                h = self._t(f"up{i}_res{j}", h, st)
            for up in blk.upsamplers or []:
                h = up(h)
        h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        video = rearrange(h, "(b f) c h w -> b c f h w", f=f)
        if not skip:
            # the output conv over time of sgm/SVD's video decoder (identity at initialisation)
            video = self.time_conv_out(video)
        return video

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, window: int = 16, overlap: int = 4, image_only: bool = False
    ) -> torch.Tensor:
        """Decode a video of any length in overlapping windows of frames, cross-faded, clamped to [-1, 1].

        The temporal convs see at most `window` frames at a time (memory); the overlap hides the seams.
        """
        f = latents.shape[2]
        dtype = next(self.parameters()).dtype
        latents = latents.to(dtype)
        if f <= window or image_only:
            chunks = [(0, f)] if not image_only else [(s, min(f, s + window)) for s in range(0, f, window)]
            return torch.cat([self(latents[:, :, s:e], image_only=image_only).float() for s, e in chunks], 2).clamp(
                -1, 1
            )
        return crossfade(lambda s, e: self(latents[:, :, s:e]), f, window, overlap, latents.device).clamp(-1, 1)

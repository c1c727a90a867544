"""Decoder section: fine-tuning the video decoder (stage=decoder, paper §3.1.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vldm.config.core import ConfigError, field_


@dataclass
class DecoderConfig:
    trainable: Literal["temporal", "decoder"] = field_(
        "temporal",
        "what trains: the added temporal layers only, or the whole decoder (spatial layers too); the encoder never "
        "does",
    )
    kernel_size: int = field_(3, "temporal kernel of the decoder's 3D convs: (k,1,1)")
    l1_weight: float = field_(1.0, "weight of the L1 reconstruction loss")
    lpips_weight: float = field_(1.0, "weight of the LPIPS loss (0 = off)")
    lpips_weights: str = field_(
        "",
        "local LPIPS file (python -m vldm.models.lpips converts the official weights); required when lpips_weight > 0",
    )
    lpips_sha256: str = field_("", "sha256 the LPIPS file must have (empty = not checked)")
    lpips_frames: int = field_(4, "frames per clip scored by LPIPS (evenly spaced; LPIPS is per image)")
    disc_weight: float = field_(0.5, "weight of the adversarial loss (3D patch discriminator, hinge)")
    disc_start: int = field_(0, "step from which the adversarial loss and the discriminator train")
    adaptive_weight: bool = field_(
        True, "scale the adversarial loss by |grad rec| / |grad adv| at the last decoder layer (taming/SD)"
    )
    disc_lr: float = field_(1e-4, "discriminator learning rate (Adam, betas 0.5, 0.9)")
    disc_channels: int = field_(64, "discriminator base channels")
    disc_layers: int = field_(3, "discriminator strided layers")

    def validate(self) -> None:
        if min(self.l1_weight, self.lpips_weight, self.disc_weight) < 0:
            raise ConfigError("decoder.*_weight: must be >= 0")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("decoder.kernel_size: must be odd")

    def validate_for_training(self) -> None:
        """Checks that only matter when this section is used (stage=decoder; Config.validate calls it)."""
        if self.lpips_weight > 0 and not self.lpips_weights:
            raise ConfigError(
                "decoder.lpips_weights: a local LPIPS file is needed when lpips_weight > 0 (or set lpips_weight=0)"
            )

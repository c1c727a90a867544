from vldm.diffusion.loss import diffusion_loss
from vldm.diffusion.sampler import (
    Conditioning,
    Known,
    decode_latents,
    denoise,
    encode_pixels,
    initial_noise,
    latent_channels,
    subseed,
    windowed,
)
from vldm.diffusion.schedule import make_scheduler, scheduler_config

__all__ = [
    "Conditioning",
    "Known",
    "decode_latents",
    "denoise",
    "diffusion_loss",
    "encode_pixels",
    "initial_noise",
    "latent_channels",
    "make_scheduler",
    "scheduler_config",
    "subseed",
    "windowed",
]

from vldm.diffusion.loss import diffusion_loss
from vldm.diffusion.sampler import decode_latents, encode_pixels, initial_noise, sample_latents
from vldm.diffusion.schedule import make_scheduler, scheduler_config

__all__ = [
    "decode_latents",
    "diffusion_loss",
    "encode_pixels",
    "initial_noise",
    "make_scheduler",
    "sample_latents",
    "scheduler_config",
]

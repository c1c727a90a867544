"""Model code: no deepspeed, ray or wandb imports here."""

from vldm.models.video_unet import VideoLDMUNet, count_parameters

__all__ = ["VideoLDMUNet", "count_parameters"]

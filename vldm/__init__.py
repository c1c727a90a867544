"""vldm: Video Latent Diffusion Models (Blattmann et al., CVPR 2023) on top of diffusers."""

__version__ = "0.1.0"

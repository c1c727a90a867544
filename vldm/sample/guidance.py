"""Moved: the denoising loop, guidance and windows live in `vldm.diffusion.sampler` (one loop for the eval
pool, the sampler and the demo). Kept as an alias for code that imports them from here."""

from vldm.diffusion.sampler import Conditioning, Known, ModelFn, denoise, subseed, windowed

__all__ = ["Conditioning", "Known", "ModelFn", "denoise", "subseed", "windowed"]

"""Sampling: the Video LDM cascade as a Python API (`Cascade`, `generate`), a diffusers pipeline
(`VideoLDMPipeline`) and a command line (`python -m vldm.sample --help`)."""

from vldm.io import write_mp4
from vldm.sample.api import Cascade, VideoOutput, generate, plan_key_frames
from vldm.sample.stages import StageModel, TextInputs

__all__ = ["Cascade", "StageModel", "TextInputs", "VideoOutput", "generate", "plan_key_frames", "write_mp4"]

"""Sampling: the Video LDM cascade as a Python API (`Cascade`, `generate`), a diffusers pipeline
(`VideoLDMPipeline`) and a command line (`python -m vldm.sample --help`)."""

from vldm.sample.api import Cascade, VideoOutput, generate, plan_key_frames
from vldm.sample.stages import StageModel, TextInputs
from vldm.sample.video import write_mp4

__all__ = ["Cascade", "StageModel", "TextInputs", "VideoOutput", "generate", "plan_key_frames", "write_mp4"]

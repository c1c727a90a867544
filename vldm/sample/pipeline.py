"""`VideoLDMPipeline`: the cascade as a diffusers `DiffusionPipeline` (save_pretrained / from_pretrained).

    pipe = VideoLDMPipeline.from_cascade(Cascade.from_runs(...))
    pipe.save_pretrained("video_ldm")                        # one self-contained directory
    pipe = VideoLDMPipeline.from_pretrained("video_ldm")
    out = pipe("a red car at night", num_frames=32)          # VideoOutput; out.save("car.mp4")

Components: `unet` (key frames, a VideoLDMUNet), `vae`, `text_encoder`, `tokenizer`, `scheduler`, and the
optional `predictor`, `interpolator`, `decoder` (VideoDecoder), `upsampler` + `upsampler_vae` (+ its own
`upsampler_text_encoder` / `upsampler_tokenizer` when it has one, as SD x4), `temporal_text_encoder` +
`temporal_tokenizer` (personalised models). What each model's training run
said about it (task, task options, clip length and size) is the `stages` entry of model_index.json.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

from vldm.config.sample import SampleConfig
from vldm.models.base import Components
from vldm.sample.api import Cascade, VideoOutput, generate
from vldm.sample.stages import StageModel

_STAGES = ("keyframes", "predictor", "interpolator", "upsampler")
_MODEL_OF = {"keyframes": "unet", "predictor": "predictor", "interpolator": "interpolator", "upsampler": "upsampler"}


class VideoLDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->decoder->vae"
    _optional_components = [
        "vae",
        "text_encoder",
        "tokenizer",
        "predictor",
        "interpolator",
        "decoder",
        "upsampler",
        "upsampler_vae",
        "upsampler_text_encoder",
        "upsampler_tokenizer",
        "low_res_scheduler",
        "temporal_text_encoder",
        "temporal_tokenizer",
    ]

    def __init__(
        self,
        unet,
        scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        predictor=None,
        interpolator=None,
        decoder=None,
        upsampler=None,
        upsampler_vae=None,
        upsampler_text_encoder=None,
        upsampler_tokenizer=None,
        low_res_scheduler=None,
        temporal_text_encoder=None,
        temporal_tokenizer=None,
        stages: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            predictor=predictor,
            interpolator=interpolator,
            decoder=decoder,
            upsampler=upsampler,
            upsampler_vae=upsampler_vae,
            upsampler_text_encoder=upsampler_text_encoder,
            upsampler_tokenizer=upsampler_tokenizer,
            low_res_scheduler=low_res_scheduler,
            temporal_text_encoder=temporal_text_encoder,
            temporal_tokenizer=temporal_tokenizer,
        )
        self.register_to_config(stages=stages or {})

    @classmethod
    def from_cascade(cls, cascade: Cascade) -> VideoLDMPipeline:
        from diffusers import DDIMScheduler

        info = {}
        for name in _STAGES:
            st: StageModel | None = getattr(cascade, name)
            if st is not None:
                info[name] = {
                    "task": st.task,
                    "task_options": st.task_options,
                    "clip_frames": st.clip_frames,
                    "size": st.size,
                    "width": st.width,
                    "scheduler_config": dict(st.scheduler_config),
                }
        comps, tt = cascade.components, cascade.temporal_text
        up_text = cascade.upsampler_text
        own_up_text = up_text is not None and up_text.text_encoder is not comps.text_encoder  # e.g. SD x4's OpenCLIP
        return cls(
            unet=cascade.keyframes.model,
            scheduler=DDIMScheduler.from_config(cascade.keyframes.scheduler_config),
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            predictor=None
            if cascade.predictor is cascade.keyframes
            else (cascade.predictor.model if cascade.predictor else None),
            interpolator=cascade.interpolator.model if cascade.interpolator else None,
            decoder=cascade.decoder,
            upsampler=cascade.upsampler.model if cascade.upsampler else None,
            upsampler_vae=cascade.upsampler_vae,
            upsampler_text_encoder=up_text.text_encoder if own_up_text else None,
            upsampler_tokenizer=up_text.tokenizer if own_up_text else None,
            low_res_scheduler=cascade.low_res_scheduler,
            temporal_text_encoder=tt.text_encoder if tt else None,
            temporal_tokenizer=tt.tokenizer if tt else None,
            stages=info,
        )

    def cascade(self) -> Cascade:
        info = self.config.stages

        def stage(name: str) -> StageModel | None:
            model = getattr(self, _MODEL_OF[name], None)
            if model is None or name not in info:
                return None
            i = info[name]
            return StageModel(
                model=model,
                task=i["task"],
                task_options=dict(i["task_options"]),
                clip_frames=i["clip_frames"],
                size=i["size"],
                width=i.get("width", 0),
                scheduler_config=dict(i.get("scheduler_config") or self.scheduler.config),
            )

        comps = Components(
            unet2d=self.unet.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler_config=dict(self.scheduler.config),
        )
        tt = None
        if self.temporal_text_encoder is not None:
            tt = Components(
                unet2d=self.unet.unet, text_encoder=self.temporal_text_encoder, tokenizer=self.temporal_tokenizer
            )
        up_text = None
        if self.upsampler is not None:
            up_text = (
                comps
                if self.upsampler_text_encoder is None
                else Components(
                    unet2d=self.upsampler.unet,
                    text_encoder=self.upsampler_text_encoder,
                    tokenizer=self.upsampler_tokenizer,
                )
            )
        low_res = self.low_res_scheduler
        if self.upsampler is not None and low_res is None:
            from vldm.tasks.paper import low_res_scheduler

            low_res = low_res_scheduler()
        return Cascade(
            keyframes=stage("keyframes"),
            components=comps,
            predictor=stage("predictor"),
            interpolator=stage("interpolator"),
            decoder=self.decoder,
            upsampler=stage("upsampler"),
            upsampler_vae=self.upsampler_vae,
            upsampler_text=up_text,
            low_res_scheduler=low_res,
            temporal_text=tt,
        )

    def __call__(
        self,
        prompt: str | list[str],
        config: SampleConfig | None = None,
        seeds: list[int] | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> VideoOutput:
        """Generate videos; keyword overrides are SampleConfig fields (num_frames, steps, guidance_scale, ...)."""
        return generate(self.cascade(), prompt, config, seeds=seeds, progress=progress, **overrides)

"""python -m vldm.sample --run RUN --prompt "..." --frames N --out video.mp4 [stage runs] [sampling options]

Samples the Video LDM cascade from training run directories (each stage's newest complete checkpoint,
or a checkpoint directory): --run is the key-frame model (a generate or predict run); --predict-run,
--interp-run, --decoder-run and --upsampler-run add the other stages. --image-mode samples every frame
independently with the image model (temporal layers skipped), for comparison. --pipeline DIR samples a
saved VideoLDMPipeline instead of runs; --save-pipeline DIR saves the loaded cascade as one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from vldm.config.core import ConfigError, from_dict
from vldm.config.sample import SampleConfig

CASCADE_ARGS = (
    "run",
    "predict_run",
    "interp_run",
    "decoder_run",
    "upsampler_run",
    "personalized",
    "lora",
    "lora_scale",
    "ema",
    "prompt",
    "num_videos",
    "out",
    "pipeline",
    "save_pipeline",
    "quiet",
)


def build_parser() -> argparse.ArgumentParser:
    from vldm.config.cli import build_parser as from_dataclass

    ap = from_dataclass(SampleConfig, prog="python -m vldm.sample", description=__doc__)
    g = ap.add_argument_group("models")
    g.add_argument(
        "--run",
        help="key-frame model: a training run (newest checkpoint) or checkpoint directory (task generate or predict)",
    )
    g.add_argument(
        "--predict-run", help="prediction model (task=predict) for long videos: rollout after the key-frame model"
    )
    g.add_argument("--interp-run", help="interpolation model (task=interpolate)")
    g.add_argument("--decoder-run", help="video decoder (stage=decoder run); default: the image decoder")
    g.add_argument("--upsampler-run", help="video upsampler (task=upsample)")
    g.add_argument(
        "--personalized",
        help="fine-tuned (e.g. DreamBooth) SD directory: its UNet and text encoder for the spatial layers (paper §4.2)",
    )
    g.add_argument("--lora", help="LoRA file fused into the personalized UNet")
    g.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale (default: 1.0)")
    g.add_argument("--ema", action="store_true", help="use the EMA weights of the runs")
    g.add_argument("--pipeline", help="a saved VideoLDMPipeline directory instead of runs")
    g.add_argument("--save-pipeline", help="also save the loaded cascade as a VideoLDMPipeline here")
    o = ap.add_argument_group("output")
    o.add_argument("--prompt", action="append", default=[], help="prompt (repeatable: one video per prompt)")
    o.add_argument("--frames", dest="num_frames", default=argparse.SUPPRESS, metavar="N", help="same as --num-frames")
    o.add_argument("--num-videos", type=int, default=1, help="videos per prompt (seeds seed, seed+1, ...) (default: 1)")
    o.add_argument(
        "--out",
        default="video.mp4",
        help="mp4 path; several videos are written as OUT_000.mp4, ... (default: video.mp4)",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = vars(ap.parse_args(argv))
    if not a["run"] and not a["pipeline"]:
        ap.error("give --run (a training run) or --pipeline (a saved VideoLDMPipeline)")
    try:
        cfg = from_dict(SampleConfig, {k: v for k, v in a.items() if k not in CASCADE_ARGS})
    except ConfigError as e:
        ap.error(str(e))
    prompts = [p for p in (a["prompt"] or [""]) for _ in range(a["num_videos"])]
    seeds = [cfg.seed + i for i in range(len(prompts))]
    if a["pipeline"]:
        from vldm.sample.pipeline import VideoLDMPipeline

        cascade = VideoLDMPipeline.from_pretrained(a["pipeline"]).cascade()
    else:
        from vldm.sample.api import Cascade

        cascade = Cascade.from_runs(
            a["run"],
            a["predict_run"],
            a["interp_run"],
            a["decoder_run"],
            a["upsampler_run"],
            a["personalized"],
            a["lora"],
            a["lora_scale"],
            a["ema"],
            cfg.device,
            cfg.dtype,
        )
    if a["save_pipeline"]:
        from vldm.sample.pipeline import VideoLDMPipeline

        VideoLDMPipeline.from_cascade(cascade).save_pretrained(a["save_pipeline"])
    from vldm.sample.api import generate

    out = generate(cascade, prompts, cfg, seeds=seeds, progress=not a["quiet"])
    paths = out.save(a["out"])
    summary = {
        "videos": [str(p) for p in paths],
        "frames": out.videos.shape[2],
        "size": list(out.videos.shape[-2:]),
        "fps": out.fps,
        "seconds": {k: round(v, 3) for k, v in out.timings.items()},
        "frames_per_stage": out.frames,
    }
    # a sidecar with everything that made the videos: prompts, seeds, models, sampling settings
    record = {
        **summary,
        "prompts": prompts,
        "seeds": seeds,
        "config": dataclasses.asdict(cfg),
        "models": {
            k: a[k]
            for k in (
                "run",
                "predict_run",
                "interp_run",
                "decoder_run",
                "upsampler_run",
                "personalized",
                "lora",
                "pipeline",
            )
            if a[k]
        },
    }
    from vldm.io import atomic_write_bytes

    atomic_write_bytes(Path(a["out"]).with_suffix(".json"), json.dumps(record, indent=1).encode())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

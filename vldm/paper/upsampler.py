"""`make paper`'s upsampler row (paper §3.4): the x4 upsampler is more consistent over time in video mode.

A pixel-space x4 upscaler (configs/paper_upsample.yaml) is trained on 128 px moving-shapes clips in two
stages through slurm/train_temporal.sbatch: the image upscaler (stage=image, noise augmentation, 32 px
patches), exported, then its temporal layers (stage=temporal). On held-out 128 px clips downsampled 4x (area),
the same model upsamples every clip in video mode and in image mode (temporal layers off) from the same
seeds; bicubic upsampling is the floor. Measured against the true 128 px clips: PSNR, temporal-difference
error (flicker the truth does not have) and flicker. The cascade row reuses this run (`train`).
"""

from __future__ import annotations

from pathlib import Path

from vldm.paper import corpora

SCALE = 4
LOW = 32  # the demo's frames (px): the upsampler makes 128 px of them, as the cascade does
TRAIN_SEED = 2  # the demo's corpus is seed 0 and the held-out truth seed 1
NOISE_LEVEL = 50  # noise augmentation level t_g at sampling (trained on 0..350)


def hires(paper) -> int:
    return SCALE * LOW


def train(paper) -> Path:
    """The upsampler's temporal run (its image stage and export before it), trained once per `make paper`."""
    if getattr(paper, "_upsampler_run", None) is not None:
        return paper._upsampler_run
    p = paper.plan
    corpus = corpora.synthetic(
        paper,
        "upsampler",
        p.upsampler_videos,
        hires(paper),
        2 * p.clip_frames,
        TRAIN_SEED,
        min_speed=0.04,
        max_speed=0.08,
    )
    shards = corpora.shards(paper, corpus, "upsampler", hires(paper), p.clip_frames)
    common = [f"data.shards={shards}", f"data.size={hires(paper)}", f"data.num_frames={p.clip_frames}"]
    image = corpora.train_run(
        paper, "configs/paper_upsample.yaml", "upsampler_image", p.upsampler_steps, [*common, "stage=image"]
    )
    export = paper.out / "models" / "upscaler"
    paper.run([paper.py, "-m", "vldm.train.export", str(image), str(export)], "3_upsampler_export.log")
    paper._upsampler_run = corpora.train_run(
        paper,
        "configs/paper_upsample.yaml",
        "upsampler",
        p.upsampler_steps,
        [*common, "stage=temporal", f"model.pretrained={export}", "wandb.name=paper-upsampler-temporal"],
    )
    return paper._upsampler_run


def upsample(paper, stage, low, seeds: list[int], image_mode: bool):
    """(b, 3, f, h, w) low-res pixels in [-1, 1] -> (b, 3, f, 4h, 4w) by the upsampler (no text: no guidance)."""
    import torch

    from vldm.config.sample import SampleConfig
    from vldm.models.base import encode_text
    from vldm.models.upsampler import load_low_res_scheduler
    from vldm.sample import stages

    cfg = SampleConfig(
        steps=paper.plan.upsample_sample_steps,
        guidance_scale=1.0,
        upsample_noise_level=NOISE_LEVEL,
        upsample_window=stage.clip_frames,
    )
    # a pixel-space model without a text encoder: its context is the fixed zero vector it was trained with
    ctx = encode_text(paper_components(stage), [""] * low.shape[0])
    out_hw = (low.shape[-2] * SCALE, low.shape[-1] * SCALE)
    with torch.no_grad():
        x = stages.upsample(
            stage, stages.TextInputs(ctx), stages.Run(cfg, seeds), low, out_hw, load_low_res_scheduler(None), image_mode
        )
    return x.clamp(-1, 1)


def paper_components(stage):
    from vldm.models.base import Components

    return Components(unet2d=stage.model.unet)


def row(paper):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    from vldm.paper import metrics as M
    from vldm.paper.rows import bars_png, upsampler_row
    from vldm.sample.runs import load_stage

    p = paper.plan
    run = train(paper)
    stage, _ = load_stage(run, ema=True)
    truth = corpora.decoded(
        corpora.synthetic(
            paper, "heldout_hires", p.upsampler_heldout, hires(paper), p.clip_frames, 1, min_speed=0.04, max_speed=0.08
        )
    )
    gt = np.stack([v[: p.clip_frames] for v, _ in truth])  # (b, f, H, W, 3) uint8
    hi = torch.from_numpy(gt).float().div(127.5).sub(1)
    frames = rearrange(hi, "b f h w c -> (b f) c h w")
    low = rearrange(F.interpolate(frames, scale_factor=1 / SCALE, mode="area"), "(b f) c h w -> b c f h w", b=len(gt))
    seeds = list(range(len(gt)))
    bicubic = F.interpolate(rearrange(low, "b c f h w -> (b f) c h w"), scale_factor=SCALE, mode="bicubic")
    videos = {
        "image_mode": upsample(paper, stage, low, seeds, True),
        "video_mode": upsample(paper, stage, low, seeds, False),
        "bicubic": rearrange(bicubic.clamp(-1, 1), "(b f) c h w -> b c f h w", b=len(gt)),
    }
    measured, samples = {}, []
    for name, v in videos.items():
        u8 = paper.to_u8(v)
        measured[name] = {
            "psnr": float(np.mean([M.psnr(a, b) for a, b in zip(u8, gt)])),
            "tde": float(np.mean([M.temporal_difference_error(a, b) for a, b in zip(u8, gt)])),
            "flicker": float(np.mean([M.flicker(a) for a in u8])),
        }
        samples += paper.save_videos("upsampler", name, u8)
    samples += paper.save_videos("upsampler", "truth", list(gt))
    out = upsampler_row(measured["image_mode"], measured["video_mode"], measured["bicubic"])
    out.baselines["real_clips"] = {"flicker": float(np.mean([M.flicker(a) for a in gt]))}
    out.metrics.update(train_steps=p.upsampler_steps, noise_level=NOISE_LEVEL, size=hires(paper))
    out.samples = samples
    out.picture = str(
        bars_png(
            paper.out / "upsampler.png",
            f"upsampler x{SCALE}: {LOW} -> {hires(paper)} px held-out clips, image vs video mode",
            {
                "temporal-difference error vs truth (0-255)": {k: v["tde"] for k, v in measured.items()},
                "PSNR vs truth (dB)": {k: v["psnr"] for k, v in measured.items()},
                "flicker (0-255)": {
                    **{k: v["flicker"] for k, v in measured.items()},
                    "real clips": out.baselines["real_clips"]["flicker"],
                },
            },
        )
    )
    return out

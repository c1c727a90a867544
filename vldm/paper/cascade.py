"""`make paper`'s cascade row: key frames -> interpolation -> decoder -> upsampler, one mp4 per prompt.

Through the library's cascade (`vldm.sample.api.generate` on `Cascade.from_runs`, then `stages.upsample` as
`generate` applies it, with the upsampler row's step count) with the other rows' models: the demo's video
model for the key frames (8 frames at 32 px, 8 fps), the interpolation row's run (x4: 29 frames at 32 fps),
the decoder row's video decoder and the upsampler row's x4 upsampler (128 px). The baseline is the same
cascade fed image-mode key frames (drawn independently by the image model); the real clips are held-out
clips generated at the final resolution and length (same seed as the truth: the same kinds of shapes,
colours and directions; a quarter of the speed per frame, as 4x the frame rate gives).
"""

from __future__ import annotations

from vldm.paper import corpora, upsampler

FACTOR = 4  # interpolation x4 (one pass) and upsampler x4


def _has_checkpoint(run) -> bool:
    from vldm.checkpoint import complete_checkpoints

    return run.is_dir() and bool(complete_checkpoints(run))


def runs(paper) -> dict:
    """The interpolation and decoder rows' runs (trained here when those rows did not run) and the upsampler's."""
    interp = paper.out / "runs" / "interpolation"
    if not _has_checkpoint(interp):
        interp = paper.train_stage(
            "configs/paper_interpolate.yaml", "interpolation", paper.plan.temporal_steps, paper.image_ldm
        )
    decoder = paper.out / "runs" / "decoder"
    if not _has_checkpoint(decoder):
        paper.row_decoder()  # trains OUT/runs/decoder (and measures it: a few seconds)
    return {"interp_run": interp, "decoder_run": decoder, "upsampler_run": upsampler.train(paper)}


def row(paper):
    import torch

    from vldm.config.sample import SampleConfig
    from vldm.paper import metrics as M
    from vldm.paper.rows import bars_png, cascade_row
    from vldm.paper.run import GUIDANCE
    from vldm.sample import stages
    from vldm.sample.api import Cascade, encode_prompts, generate

    p = paper.plan
    models = runs(paper)
    cascade = Cascade.from_runs(
        str(paper.demo / "runs" / "video"), **{k: str(v) for k, v in models.items()}, ema=True, device="cpu"
    )
    frames = FACTOR * (p.clip_frames - 1) + 1  # 8 key frames -> 29
    size = upsampler.hires(paper)
    real = corpora.decoded(
        corpora.synthetic(paper, "cascade_real", p.cascade_prompts, size, frames, 1, min_speed=0.01, max_speed=0.02)
    )
    prompts = [s["caption"] for _, s in real]
    bgs = [s["background_rgb"] for _, s in real]
    seeds = list(range(len(prompts)))
    cfg = SampleConfig(
        num_frames=frames,
        steps=p.sample_steps,
        guidance_scale=GUIDANCE,
        interp_passes=1,
        upsample=False,  # upsampled below, as `generate` does, with the upsampler row's fewer steps
    )
    out = generate(cascade, prompts, cfg, seeds=seeds, progress=False)
    final = upsampler.upsample(paper, cascade.upsampler, out.videos, seeds, False)
    if out.frames.get("decoder") != frames or tuple(final.shape[-2:]) != (size, size):
        raise RuntimeError(f"the cascade made {out.frames} frames of {tuple(final.shape[-2:])} px")
    # the baseline: the same stages from image-mode key frames
    key = cascade.keyframes
    hw = (key.size // cascade.components.vae_scale_factor,) * 2
    run = stages.Run(cfg, seeds)
    with torch.no_grad():
        text = encode_prompts(cascade, cascade.components, prompts, cfg)
        z = stages.keyframes(key, text, run, p.clip_frames, hw, image_mode=True)
        z = stages.interpolate(cascade.interpolator, text, run, z, 1, cfg.fps * FACTOR)
        low = cascade.decoder.decode(z, cfg.decoder_window, cfg.decoder_overlap)
    image_keys = upsampler.upsample(paper, cascade.upsampler, low, seeds, False)
    videos = {"cascade": paper.to_u8(final), "image_key_frames": paper.to_u8(image_keys)}
    measured, samples = {}, []
    for name, v in videos.items():
        measured[name] = {
            "identity": M.identity_summary(v, bgs),
            "motion": M.motion_summary(v, bgs),
            "shape_area": M.shape_area(v, bgs),
        }
        samples += paper.save_videos("cascade", name, v, fps=out.fps)
    gt = [v for v, _ in real]
    measured["real"] = {
        "identity": M.identity_summary(gt, bgs),
        "motion": M.motion_summary(gt, bgs),
        "shape_area": M.shape_area(gt, bgs),
    }
    samples += paper.save_videos("cascade", "real", gt, fps=out.fps)
    res = cascade_row(measured["cascade"], measured["image_key_frames"], measured["real"])
    res.metrics.update(frames=frames, size=size, fps=out.fps, stage_frames=out.frames)
    res.samples = samples
    srcs = {"cascade": "cascade", "image key frames": "image_key_frames", "real clips": "real"}
    res.picture = str(
        bars_png(
            paper.out / "cascade.png",
            f"cascade: {p.clip_frames} key frames -> {frames} frames at {size} px, vs real clips",
            {
                "acceleration (frame units)": {k: measured[v]["motion"]["accel"] for k, v in srcs.items()},
                "colour drift": {k: measured[v]["identity"]["colour_drift"] for k, v in srcs.items()},
                "area drift": {k: measured[v]["identity"]["area_drift"] for k, v in srcs.items()},
            },
        )
    )
    return res

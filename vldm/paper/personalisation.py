"""`make paper`'s personalisation row (paper §4.2): temporal layers trained on image model A, moved onto B.

A is the demo's image LDM; its corpus draws 8 colours. B is A's UNet fine-tuned (stage=image through
slurm/train_temporal.sbatch, DreamBooth-like, no prior preservation) on a few dozen clips of a colour A never
saw (`make_synthetic.py --colors pink`: NEW_COLOURS in vldm/data/synthetic.py). The demo's temporal layers,
trained on A only, go onto B with `Cascade.personalize`. On the held-out captions with their colour replaced
by the new one, measured: the fraction of frames whose shape is the new colour (nearest of the 9 colours) and
the centroid's acceleration, for A + temporal, B in image mode and B + temporal.
"""

from __future__ import annotations

from pathlib import Path

from vldm.paper import corpora

CONCEPT = "pink"
CONCEPT_SEED = 3  # the demo's corpus is seed 0, the held-out truth 1, the upsampler's corpus 2


def train_b(paper) -> Path:
    """Image model B: the demo's image LDM (A) fine-tuned on the new colour; its model directory."""
    p = paper.plan
    corpus = corpora.synthetic(
        paper,
        "concept",
        p.concept_videos,
        32,
        2 * p.clip_frames,
        CONCEPT_SEED,
        colors=CONCEPT,
        min_speed=0.04,
        max_speed=0.08,
    )
    shards = corpora.shards(paper, corpus, "concept", 32, p.clip_frames)
    run = corpora.train_run(
        paper,
        "configs/demo_image.yaml",
        "personalise_b",
        p.personalise_steps,
        [
            f"model.pretrained={paper.image_ldm}",
            f"data.shards={shards}",
            f"data.num_frames={p.clip_frames}",
            "data.holdout_shards=0",
            "optim.lr=5.0e-4",  # a fine-tune of a trained model: a quarter of the from-scratch rate
            "wandb.name=paper-personalise-b",
        ],
    )
    out = paper.out / "models" / "image_ldm_b"
    # the raw weights: an EMA of a few hundred steps from A would still be mostly A
    paper.run([paper.py, "-m", "vldm.train.export", str(run), str(out), "--raw"], "3_personalise_export.log")
    return out


def measure(paper, cascade, prompts: list[str], bgs: list, image_mode: bool, name: str) -> tuple[dict, list[str]]:
    """The prompts through `cascade` (seeds 0..n-1), saved under samples/personalisation/NAME/; concept
    fraction, identity and motion of the decoded videos."""
    import numpy as np

    from vldm.data.synthetic import ALL_COLOURS
    from vldm.paper import metrics as M
    from vldm.paper.run import GUIDANCE
    from vldm.sample.api import generate

    out = generate(
        cascade,
        prompts,
        seeds=list(range(len(prompts))),
        progress=False,
        num_frames=paper.plan.clip_frames,
        steps=paper.plan.sample_steps,
        guidance_scale=GUIDANCE,
        image_mode=image_mode,
    )
    videos = paper.to_u8(out.videos)
    target = ALL_COLOURS[CONCEPT]
    figures = {
        "concept_fraction": float(np.mean([M.colour_fraction(v, target, ALL_COLOURS, b) for v, b in zip(videos, bgs)])),
        "identity": M.identity_summary(videos, bgs),
        "motion": M.motion_summary(videos, bgs),
    }
    return figures, paper.save_videos("personalisation", name, videos)


def row(paper):
    from vldm.paper.rows import bars_png, personalisation_row
    from vldm.sample.api import Cascade

    b_dir = train_b(paper)
    video_run = paper.demo / "runs" / "video"
    # the held-out captions (shape, direction) with the new colour: "a pink circle moving up"
    prompts = [f"a {CONCEPT} {s['shapes'][0]['shape']} moving {s['shapes'][0]['direction']}" for _, s in paper.truth]
    bgs = [s["background_rgb"] for _, s in paper.truth]
    a = Cascade.from_runs(str(video_run), ema=True, device="cpu")
    measured, samples = {}, []
    measured["A_plus_temporal"], more = measure(paper, a, prompts, bgs, False, "A_plus_temporal")
    samples += more
    b = Cascade.from_runs(str(video_run), personalized=str(b_dir), ema=True, device="cpu")
    for name, image_mode in (("B_image_mode", True), ("B_plus_temporal", False)):
        measured[name], more = measure(paper, b, prompts, bgs, image_mode, name)
        samples += more
    out = personalisation_row(measured["A_plus_temporal"], measured["B_image_mode"], measured["B_plus_temporal"])
    out.metrics.update(concept=CONCEPT, train_steps=paper.plan.personalise_steps, prompts=prompts)
    out.samples = samples
    out.picture = str(
        bars_png(
            paper.out / "personalisation.png",
            f"personalisation: A's temporal layers on B (A fine-tuned on {CONCEPT})",
            {
                f"frames whose shape is {CONCEPT}": {k: v["concept_fraction"] for k, v in measured.items()},
                "acceleration (frame units)": {k: v["motion"]["accel"] for k, v in measured.items()},
                "colour drift": {k: v["identity"]["colour_drift"] for k, v in measured.items()},
            },
        )
    )
    return out

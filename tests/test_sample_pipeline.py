"""The cascade end to end: from run directories (CLI and API), image mode, and the DiffusionPipeline round trip."""

from __future__ import annotations

import dataclasses
import json

import av
import pytest
import torch
from paper_helpers import write_run

from vldm.sample import Cascade, generate
from vldm.sample.pipeline import VideoLDMPipeline
from vldm.sample.tiny import build_tiny_cascade

FAST = dict(steps=2, guidance_scale=2.0, context_guidance=1.5, progress=False)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return build_tiny_cascade(tmp_path_factory.mktemp("cascade"), clip_frames=4, size=16)


@pytest.fixture(scope="module")
def runs(cascade, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = root.parent / next(p.name for p in root.parent.iterdir() if p.name.startswith("cascade")) / "base"
    return {
        "key": write_run(root / "key", base, cascade.keyframes, num_frames=4),
        "pred": write_run(root / "pred", base, cascade.predictor, num_frames=4),
        "interp": write_run(root / "interp", base, cascade.interpolator, num_frames=17),
    }


def test_full_cascade_gives_the_requested_frames(cascade):
    # a key-frame model trained on 2-frame clips: 9 frames at x4 need 3 key frames, so the rollout adds one
    short = dataclasses.replace(cascade, keyframes=dataclasses.replace(cascade.keyframes, clip_frames=2))
    out = generate(short, ["a red square"], num_frames=9, height=8, width=8, **FAST)
    # 2 key frames from the key-frame model + 1 by rollout; x4 interpolation; the upsampler makes 8 px 32 px
    assert out.frames == {"keyframes": 3, "interpolation1": 9, "decoder": 9, "upsampler": 9}
    assert out.videos.shape == (1, 3, 9, 32, 32) and out.fps == 32.0
    assert out.videos.abs().max() <= 1.0


def test_image_mode_skips_every_temporal_layer(cascade):
    a = generate(cascade, ["x"], num_frames=3, image_mode=True, height=8, width=8, **FAST)
    assert a.frames == {"keyframes": 3, "decoder": 3}
    # frame i of image mode depends only on its own noise: equal to the image UNet sampling that frame alone
    from vldm.config.sample import SampleConfig
    from vldm.sample import stages
    from vldm.sample.api import encode_prompts

    cfg = SampleConfig(steps=2, guidance_scale=2.0)
    run = stages.Run(cfg, [0])
    z = stages.keyframes(
        cascade.keyframes, encode_prompts(cascade, cascade.components, ["x"], cfg), run, 3, (2, 2), image_mode=True
    )
    assert torch.allclose(a.latents, z)


def test_cli_samples_from_run_directories(runs, tmp_path, capsys):
    from vldm.sample.__main__ import main

    out = tmp_path / "v.mp4"
    rc = main(
        [
            "--run",
            str(runs["key"]),
            "--predict-run",
            str(runs["pred"]),
            "--interp-run",
            str(runs["interp"]),
            "--prompt",
            "a red square",
            "--frames",
            "9",
            "--steps",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--sampler",
            "dpm",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 9 and summary["frames_per_stage"]["keyframes"] == 3
    with av.open(str(out)) as f:
        assert sum(1 for _ in f.decode(video=0)) == 9


def test_cli_help(capsys):
    from vldm.sample.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--run",
        "--prompt",
        "--frames",
        "--out",
        "--context-guidance",
        "--interp-run",
        "--image-mode",
        "--sampler",
    ):
        assert flag in text


def test_predict_run_alone_rolls_out_long_videos(runs):
    cascade = Cascade.from_runs(runs["pred"])
    out = generate(cascade, ["a"], num_frames=6, interp_passes=0, steps=1, height=8, width=8, progress=False)
    assert out.frames["keyframes"] == 6 and out.videos.shape[2] == 6  # image frame, S=1 chunk, S=2 chunks


def test_pipeline_round_trips_through_save_pretrained(cascade, tmp_path):
    pipe = VideoLDMPipeline.from_cascade(cascade)
    pipe.save_pretrained(str(tmp_path / "pipe"))
    loaded = VideoLDMPipeline.from_pretrained(str(tmp_path / "pipe"))
    for name in ("unet", "predictor", "interpolator", "decoder", "upsampler", "vae", "upsampler_vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    kw = dict(num_frames=5, steps=1, guidance_scale=2.0, progress=False, upsample=False, height=8, width=8)
    # weights are equal bit for bit (above); outputs may differ in the last bits when another test
    # changed torch's thread count (reduction order), so compare them at float tolerance
    assert torch.allclose(pipe("a red square", **kw).videos, loaded("a red square", **kw).videos, atol=1e-5)


def test_personalized_cascade_reads_the_finetuned_unet_and_both_text_encoders(runs, tmp_path):
    from diffusers import UNet2DConditionModel

    from vldm.models.base import build_tiny_base

    tuned = build_tiny_base(tmp_path / "dreambooth", seed=1)  # same shape, other weights: a stand-in fine-tune
    c = Cascade.from_runs(runs["key"], personalized=tuned)
    assert torch.equal(
        c.keyframes.model.unet.conv_in.weight, UNet2DConditionModel.from_pretrained(str(tuned / "unet")).conv_in.weight
    )
    assert c.temporal_text is not None and c.temporal_text.text_encoder is not c.components.text_encoder
    out = generate(c, ["a"], num_frames=2, interp_passes=0, steps=1, height=8, width=8, progress=False)
    assert out.videos.shape[2] == 2


def test_stages_on_one_base_model_share_its_frozen_unet(runs):
    c = Cascade.from_runs(runs["key"], predict_run=runs["pred"], interp_run=runs["interp"])
    assert c.keyframes.model.unet is c.predictor.model.unet is c.interpolator.model.unet
    assert c.predictor.task == "predict" and c.interpolator.task_options["window"] == 5

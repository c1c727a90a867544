"""Cascade stages: rollouts keep their context, reach the requested length; interpolation keeps key frames."""

from __future__ import annotations

import pytest
import torch
from paper_helpers import tiny_unet

from vldm.config.sample import SampleConfig
from vldm.diffusion.sampler import Conditioning, Known, denoise, windowed
from vldm.sample import stages
from vldm.sample.api import plan_key_frames
from vldm.sample.stages import Run, TextInputs
from vldm.sample.tiny import stage_model


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _text(b: int = 2) -> TextInputs:
    g = torch.Generator().manual_seed(0)
    return TextInputs(cond=torch.randn(b, 3, 32, generator=g), uncond=torch.zeros(b, 3, 32))


def _run(**kw) -> tuple[Run, list]:
    calls = []
    cfg = SampleConfig(**{"steps": 2, "guidance_scale": 2.0, "context_guidance": 1.5, **kw})
    return Run(cfg, [0, 1], on_step=lambda: calls.append(1)), calls


def test_rollout_reproduces_given_context_exactly(unet):
    pred = stage_model(unet, "predict", clip_frames=5)
    start = torch.randn(2, 4, 3, 4, 4)
    run, _ = _run()
    video = stages.rollout(pred, _text(), run, 9, (4, 4), start=start)
    assert video.shape == (2, 4, 9, 4, 4)
    assert torch.equal(video[:, :, :3], start)  # bit for bit


def test_three_stage_rollout_gives_the_requested_length(unet, monkeypatch):
    pred = stage_model(unet, "predict", clip_frames=5)
    seen = []
    real = stages._denoise

    def spy(stage, run, shape, tags, cond, **kw):
        known = kw.get("known")
        seen.append(
            (shape[1], 0 if known is None else int(known.mask[0].sum()), "image_only" in cond.cond or shape[1] == 1)
        )
        return real(stage, run, shape, tags, cond, **kw)

    monkeypatch.setattr(stages, "_denoise", spy)
    run, calls = _run(sampler="dpm")
    video = stages.rollout(pred, _text(), run, 11, (4, 4))
    assert video.shape[2] == 11
    # image-mode first frame, then S = 1, then S = 2 chunks (5 frames: 4 then 3 new each)
    assert seen == [(1, 0, True), (5, 1, False), (5, 2, False), (5, 2, False)]
    assert len(calls) == 4 * 2 == stages.rollout_chunks(11, 5) * 2


def test_rollout_chunks_are_conditioned_on_the_newest_frames(unet):
    """The chunk after a rollout's first frames depends on them: change the start, the rest changes."""
    pred = stage_model(unet, "predict", clip_frames=4)
    run, _ = _run(guidance_scale=1.0, context_guidance=1.0)
    start = torch.randn(1, 4, 2, 4, 4)
    run.seeds = [0]
    a = stages.rollout(pred, _text(1), run, 4, (4, 4), start=start)
    b = stages.rollout(pred, _text(1), run, 4, (4, 4), start=start + 1)
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_interpolation_keeps_key_frames_at_every_fourth_position(unet):
    interp = stage_model(unet, "interpolate", {"window": 5, "stages": [1]}, clip_frames=5)
    keys = torch.randn(2, 4, 4, 4, 4)
    run, calls = _run()
    out = stages.interpolate(interp, _text(), run, keys, stage_label=1, fps_out=30.0)
    assert out.shape == (2, 4, 13, 4, 4)
    assert torch.equal(out[:, :, ::4], keys)
    assert not torch.equal(out[:, :, 1], out[:, :, 0])
    assert len(calls) == stages.interp_windows(interp, 4) * 2 == 3 * 2


def test_known_frames_replaced_at_every_step_and_at_the_end():
    shape, seen = (4, 3, 2, 2), []
    known = Known(torch.randn(1, 4, 3, 2, 2), torch.tensor([[True, False, True]]))

    def model(x, t, **kw):
        seen.append(x.clone())
        return torch.zeros_like(x)

    from vldm.models.base import SD_SCHEDULER

    out = denoise(
        model,
        shape,
        [0],
        dict(SD_SCHEDULER),
        Conditioning({"encoder_hidden_states": torch.zeros(1, 1, 4)}),
        steps=3,
        known=known,
    )
    assert torch.equal(out[:, :, [0, 2]], known.latents[:, :, [0, 2]])
    assert not torch.equal(seen[0][:, :, 0], known.latents[:, :, 0])  # noised to the step's level, not clean


def test_guidance_combines_text_and_context_branches():
    a, b, c = (torch.full((1, 1), v) for v in (1.0, 2.0, 4.0))
    cond = Conditioning({}, {}, {}, text_scale=3.0, context_scale=2.0)
    assert [n for n, _ in cond.branches()] == ["A", "C", "B"]
    # eps = A + (s_t - 1)(A - C) + (s_c - 1)(A - B)
    assert cond.combine({"A": a, "B": b, "C": c}).item() == 1 + 2 * (1 - 4) + 1 * (1 - 2)


def test_windowed_model_equals_the_model_on_short_clips_and_blends_long_ones():
    def model(x, t, **kw):
        return x * 2 + kw["temporal_cond"][:, :1]

    x, tc = torch.randn(1, 2, 11, 2, 2), torch.randn(1, 3, 11, 2, 2)
    w = windowed(model, 4, 2)
    assert torch.allclose(
        w(x, None, temporal_cond=tc), model(x, None, temporal_cond=tc), atol=1e-6
    )  # frame-local model
    assert torch.equal(windowed(model, 16, 2)(x, None, temporal_cond=tc), model(x, None, temporal_cond=tc))


def test_frame_plan():
    assert plan_key_frames(113, 4, 2) == 8 and plan_key_frames(29, 4, 1) == 8  # the paper's 8 -> 29 -> 113
    assert plan_key_frames(16, 4, 1) == 5 and plan_key_frames(16, 4, 0) == 16


def test_long_key_frame_sequences_band_temporal_attention(unet, monkeypatch):
    key = stage_model(unet, "generate", clip_frames=4)
    seen = []
    monkeypatch.setattr(
        stages,
        "_denoise",
        lambda stage, run, shape, tags, cond, **kw: seen.append(cond.cond.get("attn_band")) or torch.zeros(1),
    )
    run, _ = _run()
    stages.keyframes(key, _text(), run, 12, (2, 2))
    stages.keyframes(key, _text(), run, 4, (2, 2))  # within the trained length: full attention
    assert seen == [8, None]

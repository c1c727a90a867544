"""Weight-free video metrics: flicker, frame consistency, validation loss at fixed noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from vldm.eval.video_metrics import (
    frame_consistency,
    from_uint8,
    quantize_uint8,
    temporal_flicker,
    validation_loss,
)
from vldm.io import to_uint8


def test_flicker_is_zero_for_a_still_video_and_exact_for_alternating_frames():
    still = torch.rand(2, 3, 1, 8, 8).expand(2, 3, 5, 8, 8) * 2 - 1
    assert temporal_flicker(still).tolist() == [0.0, 0.0]
    frames = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4)
    assert temporal_flicker(frames).item() == pytest.approx(255.0)  # black/white alternation: full scale
    half = frames * 0.5  # [-0.5, 0.5] alternation: half the levels
    assert temporal_flicker(half).item() == pytest.approx(127.5)


def test_consistency_ignores_global_brightness_but_sees_content_change():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 1, 32, 32, generator=g) * 1.6 - 0.8
    brighter = torch.cat([base, base + 0.1, base + 0.2], dim=2)
    assert frame_consistency(brighter).item() == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(1, 3, 3, 32, 32, generator=g) * 2 - 1
    assert frame_consistency(noise).item() < 0.5
    # a custom feature function (e.g. CLIP embeddings) is used as given
    calls = []
    frame_consistency(noise, features=lambda fr: calls.append(fr.shape) or fr.flatten(1))
    assert calls == [torch.Size([3, 3, 32, 32])]


def test_uint8_round_trip_matches_quantisation():
    v = torch.rand(2, 3, 4, 6, 6) * 2 - 1
    u8 = to_uint8(v)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 4, 6, 6, 3)
    torch.testing.assert_close(from_uint8(u8), quantize_uint8(v))


def test_validation_loss_depends_only_on_seed_clip_and_timestep():
    sched = DDPMScheduler(num_train_timesteps=1000)
    model_fn = lambda x, t: x * 0.9  # noqa: E731 - any deterministic predictor
    lat = torch.randn(4, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    full = validation_loss(model_fn, lat, [0, 1, 2, 3], sched, (100, 900), seed=7)
    assert full.shape == (4, 2) and full.dtype == torch.float64
    # the same clips in a different split or order get the same noise, hence the same loss
    part = validation_loss(model_fn, lat[[3, 1]], [3, 1], sched, (100, 900), seed=7)
    torch.testing.assert_close(part, full[[3, 1]])
    other = validation_loss(model_fn, lat, [0, 1, 2, 3], sched, (100, 900), seed=8)
    assert not torch.allclose(other, full)
    with pytest.raises(ValueError, match="outside"):
        validation_loss(model_fn, lat, [0, 1, 2, 3], sched, (1000,), seed=7)

"""The ground-truth metrics of `make paper` (vldm/paper/metrics.py), each on real synthetic clips
(rendered by vldm.data.synthetic, encoded with libx264 and decoded with PyAV, as the corpus is): a
real clip scores ~0, the same clip with its identity or motion broken scores far higher."""

from __future__ import annotations

import numpy as np
import pytest

from vldm.config.data import SyntheticConfig
from vldm.data.codec import decode_all
from vldm.data.synthetic import PALETTE, make_video, render
from vldm.io import encode_frames
from vldm.paper import metrics as M

CFG = SyntheticConfig(output="", count=12, size="32", frames=16, max_shapes=1, min_speed=0.04, max_speed=0.08)


def clips(n: int = 12) -> list[tuple[np.ndarray, dict]]:
    out = []
    for i in range(n):
        frames, side = make_video(CFG, i)
        out.append((decode_all(encode_frames(frames, 8.0, crf=12)), side))
    return out


@pytest.fixture(scope="module")
def real():
    return clips()


def recolour(side: dict, frames_from: int, colour: str | None = None, shape: str | None = None) -> np.ndarray:
    """The clip of `side` re-rendered with a different colour / shape from frame `frames_from` on."""
    from vldm.data.synthetic import Track

    t = side["shapes"][0]
    pos = np.asarray(t["trajectory"])
    bg = tuple(side["background_rgb"])

    def draw(c, s, p):
        return render([Track(s, c, t["radius"], (0.0, 0.0), "right", p, [])], bg, 32, 32)

    a = draw(t["color"], t["shape"], pos[:frames_from])
    b = draw(colour or t["color"], shape or t["shape"], pos[frames_from:])
    return decode_all(encode_frames(np.concatenate([a, b]), 8.0, crf=12))


def test_real_clips_keep_their_identity(real):
    for video, side in real:
        d = M.identity_drift(video, side["background_rgb"])
        assert d["presence"] == 1.0
        assert d["colour"] < 0.07, (side["caption"], d)
        assert d["area"] < 0.12, (side["caption"], d)


def test_a_colour_change_midway_is_a_large_drift(real):
    video, side = real[0]
    other = next(c for c in PALETTE if c != side["shapes"][0]["color"])
    changed = recolour(side, 8, colour=other)
    base = M.identity_drift(video, side["background_rgb"])["colour"]
    drift = M.identity_drift(changed, side["background_rgb"])["colour"]
    expected = np.linalg.norm(np.subtract(PALETTE[other], side["shapes"][0]["rgb"])) / 255 / 2
    assert drift > 10 * max(base, 0.005)
    assert drift == pytest.approx(expected, rel=0.35)  # half the frames are the other colour


def test_a_shape_change_midway_is_an_area_drift(real):
    video, side = real[1]
    new = "triangle" if side["shapes"][0]["shape"] != "triangle" else "square"
    changed = recolour(side, 8, shape=new)
    assert (
        M.identity_drift(changed, side["background_rgb"])["area"]
        > 3 * M.identity_drift(video, side["background_rgb"])["area"] + 0.1
    )


def test_trajectory_error_is_zero_on_the_truth_and_grows_with_an_offset(real):
    for video, side in real[:4]:
        assert M.trajectory_error(video, video, side["background_rgb"]) == 0.0
    video, side = real[2]
    t = side["shapes"][0]
    from vldm.data.synthetic import Track

    shifted = render(
        [Track(t["shape"], t["color"], t["radius"], (0.0, 0.0), "right", np.asarray(t["trajectory"]) + [3.2, 0], [])],
        tuple(side["background_rgb"]),
        32,
        32,
    )
    err = M.trajectory_error(decode_all(encode_frames(shifted, 8.0, crf=12)), video, side["background_rgb"])
    assert err == pytest.approx(3.2 / 32, abs=0.02)  # the shape clipped at a border moves its centroid less
    empty = np.zeros_like(video)
    empty[:] = side["background_rgb"]
    assert M.trajectory_error(empty, video, side["background_rgb"]) == M.MISSING_ERROR


def test_mask_iou_sees_the_ghosts_of_a_cross_fade():
    from vldm.data.synthetic import Track

    pos = np.array([[8.0, 10.0], [15.0, 14.0], [22.0, 18.0]])  # constant velocity, no bounce
    video = decode_all(
        encode_frames(render([Track("square", "blue", 4.5, (0, 0), "right", pos, [])], (0, 0, 0), 32, 32), 8.0, crf=12)
    )
    assert M.mask_iou(video, video, (0, 0, 0)) == 1.0
    fade = np.rint(0.5 * video[0].astype(np.float32) + 0.5 * video[2]).astype(np.uint8)[None]
    mid = video[1:2]
    # the mean position of the two half-shapes is right (constant velocity) ...
    assert M.trajectory_error(fade, mid, (0, 0, 0)) < 0.02
    # ... but the shape is not: the half-shapes overlap the true one little
    assert M.mask_iou(fade, mid, (0, 0, 0)) < 0.5
    assert M.mask_iou(video[:1], mid, (0, 0, 0)) < 0.5  # the nearest key frame: the shape in the wrong place


def test_centroids_follow_the_sidecar_trajectory(real):
    for video, side in real:
        if side["shapes"][0]["shape"] == "triangle":
            continue  # a triangle's area centroid sits r/3 below its box centre
        c = M.shape_features(video, side["background_rgb"])["centroid"] * 32
        np.testing.assert_allclose(c, side["shapes"][0]["trajectory"], atol=0.35)


def test_acceleration_real_vs_shuffled(real):
    videos = [v for v, _ in real]
    acc = M.motion_summary(videos)["accel"]
    rng = np.random.default_rng(0)
    shuffled = M.motion_summary([v[rng.permutation(len(v))] for v in videos])["accel"]
    assert acc < 0.02 and shuffled > 5 * acc


def test_flicker_psnr_and_temporal_difference(real):
    video, _ = real[3]
    assert M.psnr(video, video) == float("inf") and M.temporal_difference_error(video, video) == 0.0
    rng = np.random.default_rng(0)
    # the same per-frame noise level, once frozen over time and once fresh in every frame
    frozen = np.clip(video + rng.normal(0, 8, video.shape[1:]), 0, 255).astype(np.uint8)
    fresh = np.clip(video + rng.normal(0, 8, video.shape), 0, 255).astype(np.uint8)
    assert abs(M.psnr(frozen, video) - M.psnr(fresh, video)) < 0.5  # similar PSNR ...
    assert M.temporal_difference_error(fresh, video) > 3 * M.temporal_difference_error(frozen, video)  # ... flicker
    assert M.flicker(fresh) > M.flicker(video)


def test_bad_input_is_a_clear_error(real):
    video, _ = real[0]
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(video, video[:-1])
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        M.flicker(video[..., 0])
    blank = np.zeros_like(video)
    with pytest.raises(ValueError, match="no shape"):
        M.trajectory_error(video, blank, (0, 0, 0))
    assert M.identity_drift(blank, (0, 0, 0)) == {"colour": None, "area": None, "presence": 0.0}

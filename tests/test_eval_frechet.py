"""Frechet distance: float64, symmetric eigh form, and mergeable streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from vldm.eval.frechet import FeatureStats, SmallSampleWarning, frechet_distance, frechet_from_stats


def _random_cov(rng, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return scale * a @ a.T / (2 * d) + 1e-3 * np.eye(d)


def _sqrtm_fd(mu1, s1, mu2, s2) -> float:
    """The usual implementation (pytorch-fid, most FVD code), as the reference."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_distance_of_a_set_to_itself_is_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)) * rng.uniform(0.1, 3, 64) + 5
    st = FeatureStats(64).update(x)
    assert frechet_from_stats(st, st) == pytest.approx(0.0, abs=1e-8)
    mu, cov = st.mean_cov()
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_closed_form_for_two_gaussians():
    rng = np.random.default_rng(1)
    d = 32
    # commuting covariances (same eigenvectors): Tr sqrt(S1 S2) = sum sqrt(l1 * l2)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    l1, l2 = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9 + 1
    )


@pytest.mark.parametrize("d", [8, 64, 256])
def test_agrees_with_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _sqrtm_fd(mu1, s1, mu2, s2)
    assert abs(ours - ref) / abs(ref) < 1e-6


def test_singular_covariances_take_the_square_root_path():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((40, 20)), rng.standard_normal((40, 25))
    s1, s2 = a @ a.T / 20, b @ b.T / 25  # rank 20 and 25 in 40-d: no Cholesky factor for either
    mu = np.zeros(40)
    fd = frechet_distance(mu, s1, mu, s2)
    ref = _sqrtm_fd(mu, s1, mu, s2)
    assert np.isfinite(fd) and abs(fd - ref) / ref < 1e-6


def test_singular_covariances_stay_finite_and_nonnegative():
    rng = np.random.default_rng(2)
    a = FeatureStats(64).update(rng.standard_normal((10, 64)))  # rank 9 covariance
    b = FeatureStats(64).update(rng.standard_normal((10, 64)))
    with pytest.warns(SmallSampleWarning, match="N=10 < feature dim 64"):
        v = frechet_from_stats(a, b)
    assert np.isfinite(v) and v >= 0


def test_low_rank_form_equals_the_full_form():
    rng = np.random.default_rng(6)
    big = FeatureStats(64).update(rng.standard_normal((500, 64)) * 1.5)
    small = FeatureStats(64).update(rng.standard_normal((20, 64)) + 0.3)  # rows kept: 20 <= 64
    assert small.rows() is not None and big.rows() is None
    mu1, s1 = big.mean_cov()
    mu2, s2 = small.mean_cov()
    with pytest.warns(SmallSampleWarning):
        fast = frechet_from_stats(big, small)
    # the full form takes square roots of ~1e-16 eigenvalues of the singular covariance: ~1e-8 round-off
    assert fast == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    assert fast == pytest.approx(_sqrtm_fd(mu1, s1, mu2, s2), rel=1e-6)


def test_streaming_stats_equal_batch_stats():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 48)) * 2 + 3
    st = FeatureStats(48)
    for chunk in np.array_split(x, 7):
        st.update(chunk)
    mu, cov = st.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_merging_shards_in_any_order_equals_one_pass():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 16))
    whole = FeatureStats(16).update(x)
    parts = [FeatureStats(16).update(c) for c in np.array_split(x, 5)]
    forward, backward = FeatureStats(16), FeatureStats(16)
    for p in parts:
        forward.merge(FeatureStats.from_bytes(p.to_bytes()))
    for p in reversed(parts):
        backward.merge(FeatureStats.from_bytes(p.to_bytes()))
    for m in (forward, backward):
        assert m.count == 200
        np.testing.assert_allclose(m.sum, whole.sum, rtol=1e-12)
        np.testing.assert_allclose(m.outer, whole.outer, rtol=1e-12)


def test_save_load_round_trip_both_storage_forms(tmp_path):
    rng = np.random.default_rng(5)
    small = FeatureStats(100).update(rng.standard_normal((7, 100)))  # fewer rows than dims: rows are stored
    large = FeatureStats(4).update(rng.standard_normal((50, 4)))  # moments are stored
    for i, st in enumerate((small, large)):
        st.save(tmp_path / f"s{i}.npz")
        back = FeatureStats.load(tmp_path / f"s{i}.npz")
        assert back.count == st.count
        np.testing.assert_allclose(back.sum, st.sum, rtol=1e-12)
        np.testing.assert_allclose(back.outer, st.outer, rtol=1e-12)
    assert (tmp_path / "s0.npz").stat().st_size < 100 * 100 * 8  # rows, not the 100x100 matrix


def test_bad_input_is_refused():
    st = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        st.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        st.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="cannot merge"):
        st.merge(FeatureStats(3))

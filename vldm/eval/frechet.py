"""Frechet distance between Gaussians fitted to features, and the mergeable statistics behind it.

    FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1^1/2 S2 S1^1/2)

computed in float64 with symmetric eigendecompositions only (reference §4): S1^1/2 S2 S1^1/2 is
symmetric PSD, so its square root's trace is the sum of the square roots of its eigenvalues (S1^1/2
may be any factor of S1, see `trace_sqrt_product`). This avoids `scipy.linalg.sqrtm` (non-symmetric
Schur form, complex round-off, `disp=` being removed) and is several times faster at 2048-d.

Statistics are kept as (count, sum, sum of outer products): adding a batch and merging two shards are
both plain additions, so shards computed on different workers combine exactly in any order.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from vldm.io import atomic_write_bytes


class SmallSampleWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and FD strongly biased."""


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    # 'evd' (divide and conquer) is ~10x faster than numpy's eigh on this CPU at 2048-d
    w, v = scipy.linalg.eigh(mat, driver="evd", check_finite=False)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sum_sqrt_eigvals(m: np.ndarray) -> float:
    m = (m + m.T) / 2  # exact symmetry for eigh: round-off makes m very slightly asymmetric
    ev = scipy.linalg.eigh(m, eigvals_only=True, driver="evd", check_finite=False)
    # tiny negative eigenvalues are round-off of a PSD matrix
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) for symmetric PSD S1, S2, as Tr sqrt(S1^1/2 S2 S1^1/2).

    Any factor S1 = A A^T gives a matrix A^T S2 A with the same eigenvalues as S1^1/2 S2 S1^1/2
    (both are similar to S1 S2), still symmetric PSD. The Cholesky factor is several times cheaper
    than the symmetric square root (an eigendecomposition with vectors); a singular S1 (fewer samples
    than dimensions) has no Cholesky factor and takes the square root instead.
    """
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    for a, b in ((s1, s2), (s2, s1)):  # Tr sqrt(S1 S2) = Tr sqrt(S2 S1): either may be factored
        try:
            chol = scipy.linalg.cholesky(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        # L^T B L with two triangular multiplies (BLAS trmm): half the flops of two general matmuls
        bl = scipy.linalg.blas.dtrmm(1.0, chol, b, side=1, lower=1)
        return _sum_sqrt_eigvals(scipy.linalg.blas.dtrmm(1.0, chol, bl, side=0, lower=1, trans_a=1))
    s1h = _sqrt_psd(s1)
    return _sum_sqrt_eigvals(s1h @ s2 @ s1h)


def trace_sqrt_product_lowrank(sigma: np.ndarray, rows: np.ndarray) -> float:
    """Tr sqrt(sigma S) where S = cov(rows) has rank < n rows: exact, without any d x d square root.

    With Y the centred rows scaled by 1/sqrt(n-1), S = Y^T Y and sigma^1/2 S sigma^1/2 = Z^T Z with
    Z = Y sigma^1/2, whose non-zero eigenvalues are those of Z Z^T = Y sigma Y^T (n x n).
    """
    x = np.asarray(rows, np.float64)
    y = (x - x.mean(0)) / np.sqrt(x.shape[0] - 1)
    m = y @ np.asarray(sigma, np.float64) @ y.T
    ev = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, check_finite=False)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(fd, 0.0)  # a distance; tiny negatives are round-off (e.g. a set against itself)


@dataclass
class FeatureStats:
    """Streaming first and second moments of feature vectors: count, sum, sum of outer products.

    While a set has at most `dim` rows, its rows are also kept: they are smaller than the dim x dim
    outer-product matrix, so `save` stores them instead (the same information, exactly).
    """

    dim: int
    count: int = 0
    sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]
    _rows: list[np.ndarray] | None = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> FeatureStats:
        """Add a (n, dim) batch (numpy or torch)."""
        x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) features, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("non-finite features (NaN/inf): the extractor or its input is broken")
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        if self._rows is not None:
            self._rows.append(x)
            if self.count > self.dim:
                self._rows = None
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Combine two disjoint sets (in place); the result is independent of merge order up to round-off."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d stats into {self.dim}-d stats")
        if self._rows is not None and other._rows is not None and self.count + other.count <= self.dim:
            self._rows = self._rows + other._rows
        else:
            self._rows = None
        self.count += other.count
        self.sum = self.sum + other.sum
        self.outer = self.outer + other.outer
        return self

    def rows(self) -> np.ndarray | None:
        """The feature rows themselves while the set has at most `dim` of them, else None."""
        if self._rows is None or self.count < 2:
            return None
        return np.concatenate(self._rows)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (the same estimator as np.cov)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (cov + cov.T) / 2

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        if self._rows is not None:
            rows = np.concatenate(self._rows) if self._rows else np.zeros((0, self.dim))
            np.savez(buf, dim=self.dim, rows=rows)
        else:
            np.savez(buf, dim=self.dim, count=self.count, sum=self.sum, outer=self.outer)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        with np.load(io.BytesIO(data)) as z:
            st = cls(int(z["dim"]))
            if "rows" in z:
                if len(z["rows"]):
                    st.update(z["rows"])
            else:
                st.count, st.sum, st.outer, st._rows = int(z["count"]), z["sum"].copy(), z["outer"].copy(), None
        return st

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file + rename)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        return cls.from_bytes(Path(path).read_bytes())


def frechet_from_stats(a: FeatureStats, b: FeatureStats, name: str = "FD") -> float:
    """FD between two feature sets; warns (SmallSampleWarning) when either has fewer samples than dims."""
    for label, st in (("first", a), ("second", b)):
        if st.count < st.dim:
            warnings.warn(
                f"{name}: {label} set has N={st.count} < feature dim {st.dim}: the covariance is "
                "singular and the distance is strongly biased (compare only at equal N)",
                SmallSampleWarning,
                stacklevel=2,
            )
    mu1, s1 = a.mean_cov()
    mu2, s2 = b.mean_cov()
    small, other = (b, s1) if b.rows() is not None else (a, s2) if a.rows() is not None else (None, None)
    if small is None:
        return frechet_distance(mu1, s1, mu2, s2)
    # a set with fewer rows than dims: the n x n form is exact and avoids two d x d eigendecompositions
    diff = mu1 - mu2
    tr = trace_sqrt_product_lowrank(other, small.rows())
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr), 0.0)

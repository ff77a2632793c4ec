"""Sample-quality estimators on extracted features, in two conventions. The project's: KID (the unbiased MMD² with a 95%
interval from its jackknife variance, whose coverage is measured), FID and Inception Score with their spread at the counts
used (both are biased at finite counts, so they get a standard deviation, not an interval). The published one: FID, IS as
the mean ± sd over 10 splits, KID as the mean ± sd over 1000-row subsets. NumPy only; which network made the features, and
how they are scaled, is the caller's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Z95 = 1.959963984540054  # the normal 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    """A value with the bounds of its confidence interval (95% unless the producer says otherwise)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class Spread:
    """A biased estimator's value and its standard deviation at the counts it was computed at: how much it moves between
    draws of that size, not an interval for the population value (which it over- or underestimates)."""

    value: float
    sd: float

    def __str__(self) -> str:
        return f"{self.value:.4g} ±{self.sd:.2g}"


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance (n − 1) of a feature set (n, d): what FID compares, and what a statistics file holds."""
    x = features.astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance_from_statistics(mu_x: np.ndarray, sigma_x: np.ndarray, mu_y: np.ndarray, sigma_y: np.ndarray) -> float:
    """FID from two sets' statistics: |μx − μy|² + tr Σx + tr Σy − 2 tr (Σx^½ Σy Σx^½)^½ (Heusel et al. 2017)."""
    w, v = np.linalg.eigh(sigma_x)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma_y @ root), 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(sigma_x) + np.trace(sigma_y) - 2 * cross)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FID between feature sets x (n, d) and y (m, d): |μx − μy|² + tr Σx + tr Σy − 2 tr (Σx Σy)^½ (Heusel et al. 2017)."""
    if len(x) * len(y) > x.shape[1] ** 2:
        return frechet_distance_from_statistics(*fid_statistics(x), *fid_statistics(y))
    # few rows: the nonzero eigenvalues of Σx Σy are the squared singular values of Xc Ycᵀ / √((n−1)(m−1)), in n × m
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    trace_x, trace_y = (xc**2).sum() / (len(x) - 1), (yc**2).sum() / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + trace_x + trace_y - 2 * cross)


@dataclass(frozen=True)
class Scaler:
    """A fixed per-feature affine map (mean, sd from one set chosen once, e.g. training-split features): KID's kernel
    then depends on neither compared set, so the MMD² estimate stays an unbiased U-statistic. Features constant on the
    fitting set are left out."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Scaler:
        return cls(features.mean(0), features.std(0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        keep = self.sd > 0
        return (x[:, keep] - self.mean[keep]) / self.sd[keep]


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (aᵀb / d + 1)³, KID's kernel (Bińkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kernel_sums(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray):
    """The kernel matrices' diagonal-free copies, totals and row/column sums, shared by the estimators below."""
    kx, ky = kxx - np.diag(np.diag(kxx)), kyy - np.diag(np.diag(kyy))
    return kx, ky, kx.sum(), ky.sum(), kxy.sum(), kx.sum(1), ky.sum(1), kxy.sum(1), kxy.sum(0)


def mmd2_jackknife(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> tuple[float, float]:
    """The unbiased MMD² U-statistic of kernel matrices k(x, x) (n × n), k(y, y) (m × m), k(x, y) (n × m) (Gretton et al.
    2012, eq. 3) and its two-sample jackknife variance (each set's delete-one values, Arvesen 1969): never negative, and
    larger than the true variance by about its second-order part (Efron & Stein 1981), so conservative where the two
    distributions nearly agree. O(n² + m² + nm) from row sums; n, m ≥ 3."""
    n, m = len(kxx), len(kyy)
    if n < 3 or m < 3:
        raise ValueError(f"the MMD² jackknife needs at least 3 rows per set, got {n} and {m}")
    _, _, sx, sy, t, rx, ry, q, p = _kernel_sums(kxx, kyy, kxy)
    value = sx / (n * (n - 1)) + sy / (m * (m - 1)) - 2 * t / (n * m)
    without_x = (sx - 2 * rx) / ((n - 1) * (n - 2)) + sy / (m * (m - 1)) - 2 * (t - q) / ((n - 1) * m)
    without_y = sx / (n * (n - 1)) + (sy - 2 * ry) / ((m - 1) * (m - 2)) - 2 * (t - p) / (n * (m - 1))
    variance = (n - 1) / n * ((without_x - without_x.mean()) ** 2).sum() + (m - 1) / m * ((without_y - without_y.mean()) ** 2).sum()
    return float(value), float(variance)


def mmd2_unbiased_variance(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """An unbiased estimate of the MMD² U-statistic's variance: the exact variance of a two-sample U-statistic of degree
    (2, 2) (Hoeffding decomposition), each moment replaced by its own U-statistic. Unbiased but noisy: where the two
    distributions nearly agree its first-order terms cancel only in expectation, and it is negative in about one draw in
    six on this project's features (bench/interval_coverage.py), which is why KID's interval uses the jackknife. n, m ≥ 4."""
    n, m = len(kxx), len(kyy)
    if n < 4 or m < 4:
        raise ValueError(f"the MMD² variance needs at least 4 rows per set, got {n} and {m}")
    kx, ky, sx, sy, t, rx, ry, q, p = _kernel_sums(kxx, kyy, kxy)
    sx2, sy2, t2 = (kx**2).sum(), (ky**2).sum(), (kxy**2).sum()
    n2, n3, n4 = n * (n - 1), n * (n - 1) * (n - 2), n * (n - 1) * (n - 2) * (n - 3)
    m2, m3, m4 = m * (m - 1), m * (m - 1) * (m - 2), m * (m - 1) * (m - 2) * (m - 3)
    # E k(x,x')², E k(x,x')k(x,x''), and (E k(x,x'))² from four distinct rows; the same for y
    var_a = _one_sample_variance(n, sx2 / n2, ((rx**2).sum() - sx2) / n3, (sx**2 - 4 * (rx**2).sum() + 2 * sx2) / n4)
    var_b = _one_sample_variance(m, sy2 / m2, ((ry**2).sum() - sy2) / m3, (sy**2 - 4 * (ry**2).sum() + 2 * sy2) / m4)
    mu_xy_sq = (t**2 - (q**2).sum() - (p**2).sum() + t2) / (n2 * m2)
    var_xy = t2 / (n * m) - mu_xy_sq  # Var k(x, y)
    shared_x = ((q**2).sum() - t2) / (n * m2) - mu_xy_sq  # Cov(k(x, y), k(x, y'))
    shared_y = ((p**2).sum() - t2) / (n2 * m) - mu_xy_sq  # Cov(k(x, y), k(x', y))
    var_c = (var_xy + (m - 1) * shared_x + (n - 1) * shared_y) / (n * m)
    eta_x = (rx @ q) / (n2 * m) - (sx * t - 2 * (rx @ q)) / (n3 * m)  # Cov(k(x, x'), k(x, y))
    eta_y = (ry @ p) / (m2 * n) - (sy * t - 2 * (ry @ p)) / (m3 * n)  # Cov(k(y, y'), k(x, y))
    return float(var_a + var_b + 4 * var_c - 8 * eta_x / n - 8 * eta_y / m)


def _one_sample_variance(n: int, second: float, shared: float, mean_sq: float) -> float:
    """Var of a degree-2 one-sample U-statistic: (2 / n(n−1)) [2(n−2) ζ1 + ζ2], ζ1 = E h(x,x')h(x,x'') − μ², ζ2 = E h² − μ²."""
    return 2 * (2 * (n - 2) * (shared - mean_sq) + (second - mean_sq)) / (n * (n - 1))


def kid(x: np.ndarray, y: np.ndarray, z: float = Z95) -> Estimate:
    """KID of feature sets x (n, d) and y (m, d): the unbiased MMD² with the cubic kernel (Bińkowski et al. 2018, eq. 3),
    ± ``z`` × its jackknife standard deviation: an interval for the population MMD² (coverage measured by
    bench/interval_coverage.py)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    value, variance = mmd2_jackknife(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    half = z * math.sqrt(variance)
    return Estimate(value, value - half, value + half)


def kid_in_blocks(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> float:
    """KID of large sets in O((n + m) · size) memory: the mean over disjoint ``size``-row blocks of x of the unbiased
    MMD² against a random ``size``-row block of y; each term is unbiased, so is the mean."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.default_rng(seed)
    terms = []
    for block in np.array_split(rng.permutation(len(x)), max(1, len(x) // size)):
        a, b = x[block], y[rng.choice(len(y), size=min(len(y), len(block)), replace=False)]
        terms.append(mmd2_jackknife(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b))[0])
    return float(np.mean(terms))


def inception_score(logits: np.ndarray) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) over all of ``logits`` at once (Salimans et al. 2016; one split)."""
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0))
    return float(np.exp((p * (log_p - log_marginal)).sum(1).mean()))


def inception_score_splits(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> Spread:
    """Inception Score as published: on each of ``splits`` consecutive parts of the rows in a seeded random order, and
    the mean and sd (ddof 0) over parts (Salimans et al. 2016, §4; the order and parts torch-fidelity uses)."""
    n = len(logits)
    if n < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} rows, got {n}")
    shuffled = logits[np.random.RandomState(seed).permutation(n)]
    scores = [inception_score(shuffled[i * n // splits:(i + 1) * n // splits]) for i in range(splits)]
    return Spread(float(np.mean(scores)), float(np.std(scores)))


def kid_subsets(x: np.ndarray, y: np.ndarray, subsets: int = 100, size: int = 1000, seed: int = 2020) -> Spread:
    """KID as published: the unbiased MMD² (cubic kernel) of ``subsets`` random ``size``-row subsets of x and of y, its
    mean and sd (ddof 0) over subsets (Bińkowski et al. 2018, §4; the draws torch-fidelity makes)."""
    if min(len(x), len(y)) < size:
        raise ValueError(f"KID over {size}-row subsets needs at least {size} rows per set, got {len(x)} and {len(y)}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.RandomState(seed)
    terms = []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        terms.append(mmd2_jackknife(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b))[0])
    return Spread(float(np.mean(terms)), float(np.std(terms)))


def bootstrap_spread(statistic: Callable[[np.ndarray, np.ndarray], float], n: int, m: int, resamples: int, seed: int) -> Spread:
    """statistic(ix, iy) on all n and m rows, with the standard deviation of its value over ``resamples`` bootstrap
    draws of both sets: the estimator's spread at these counts."""
    value = statistic(np.arange(n), np.arange(m))
    rng = np.random.default_rng(seed)
    sd = float(np.std([statistic(rng.integers(n, size=n), rng.integers(m, size=m)) for _ in range(resamples)], ddof=1))
    return Spread(value, sd)

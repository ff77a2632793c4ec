"""Sample-quality estimators on extracted features, each with a bootstrap confidence interval: Fréchet distance (FID),
kernel distance (KID, unbiased, on standardised features) and Inception Score. NumPy only; the feature extractors
(which network, which weights) are the caller's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A metric's value with the bounds of its confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FID between feature sets x (n, d) and y (m, d): |μx − μy|² + tr Σx + tr Σy − 2 tr (Σx Σy)^½ (Heusel et al. 2017)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    if len(x) * len(y) <= x.shape[1] ** 2:
        # the nonzero eigenvalues of Σx Σy are the squared singular values of Xc Ycᵀ / √((n−1)(m−1)): exact for any d
        cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    else:  # many rows: the same trace as Σ eigenvalues of Σx^½ Σy Σx^½ (symmetric), in d × d
        w, v = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (yc.T @ yc / (len(y) - 1)) @ root), 0, None)).sum()
    trace_x, trace_y = (xc**2).sum() / (len(x) - 1), (yc**2).sum() / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + trace_x + trace_y - 2 * cross)


def standardise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y scaled by y's per-feature mean and standard deviation; features constant on y are left out."""
    mean, std = y.mean(0), y.std(0)
    keep = std > 0
    return (x[:, keep] - mean[keep]) / std[keep], (y[:, keep] - mean[keep]) / std[keep]


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (aᵀb / d + 1)³, KID's kernel (Bińkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mean_off_ties(k: np.ndarray, idx: np.ndarray) -> float:
    """Mean of k[i, j] over index pairs that are distinct draws (a bootstrap's repeats are not pairs of a U-statistic)."""
    return float(k[np.ix_(idx, idx)][idx[:, None] != idx[None, :]].mean())


def kid_in_blocks(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> float:
    """KID of large sets in O((n + m) · size) memory: the mean over disjoint ``size``-row blocks of x of the unbiased
    MMD² against a random ``size``-row block of y (features standardised by all of y); each term is unbiased, so is the mean."""
    xs, ys = standardise(x.astype(np.float64), y.astype(np.float64))
    rng = np.random.default_rng(seed)
    terms = []
    for block in np.array_split(rng.permutation(len(xs)), max(1, len(xs) // size)):
        a, b = xs[block], ys[rng.choice(len(ys), size=min(len(ys), len(block)), replace=False)]
        ia, ib = np.arange(len(a)), np.arange(len(b))
        terms.append(_mean_off_ties(polynomial_kernel(a, a), ia) + _mean_off_ties(polynomial_kernel(b, b), ib)
                     - 2 * float(polynomial_kernel(a, b).mean()))
    return float(np.mean(terms))


def kid_statistic(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    """The unbiased MMD² with the cubic kernel of rows ix of x against rows iy of y (features standardised by y's
    statistics), as a function of (ix, iy): KID (Bińkowski et al. 2018, eq. 3) for every resample from one set of kernels."""
    xs, ys = standardise(x.astype(np.float64), y.astype(np.float64))
    kxx, kyy, kxy = polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys)
    return lambda ix, iy: _mean_off_ties(kxx, ix) + _mean_off_ties(kyy, iy) - 2 * float(kxy[np.ix_(ix, iy)].mean())


def inception_score(logits: np.ndarray) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) over all of ``logits`` at once (Salimans et al. 2016; one split)."""
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0))
    return float(np.exp((p * (log_p - log_marginal)).sum(1).mean()))


def bootstrap(statistic: Callable[[np.ndarray, np.ndarray], float], n: int, m: int, resamples: int, seed: int,
              z: float = 1.96) -> Estimate:
    """statistic(ix, iy) on all n and m rows, ± z bootstrap standard deviations over ``resamples`` draws of both sets
    (95% by default): the spread of the estimate at these counts. FID's small-sample bias is not removed; compare FIDs
    at equal counts, or use KID, which is unbiased."""
    value = statistic(np.arange(n), np.arange(m))
    rng = np.random.default_rng(seed)
    sd = float(np.std([statistic(rng.integers(n, size=n), rng.integers(m, size=m)) for _ in range(resamples)], ddof=1))
    return Estimate(value, value - z * sd, value + z * sd)

"""Hyvärinen's (2005) closed-form examples of score matching: the Gaussian and ICA with a logistic prior."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

_C = math.pi / (2 * math.sqrt(3))  # makes the logistic density below have unit variance


def logistic_G(s: torch.Tensor) -> torch.Tensor:
    """G(s) = −2 log cosh(π s/(2√3)) − log(4√3/π), the unit-variance logistic log-density of the ICA sources
    (Hyvärinen 2005, §3.2)."""
    a = _C * s
    log_cosh = a.abs() + torch.log1p(torch.exp(-2 * a.abs())) - math.log(2.0)  # stable for large |a|
    return -2 * log_cosh - math.log(2.0 / _C)


def logistic_g(s: torch.Tensor) -> torch.Tensor:
    """g = G′(s) = −(π/√3) tanh(π s/(2√3))."""
    return -2 * _C * torch.tanh(_C * s)


def logistic_g_prime(s: torch.Tensor) -> torch.Tensor:
    """g′(s) = −(π²/6) sech²(π s/(2√3))."""
    return -2 * _C**2 / torch.cosh(_C * s).pow(2)


def gaussian_score_matching(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimiser (μ, M) of J̄(μ, M) = mean_i[−Tr M + ½(x_i−μ)ᵀMM(x_i−μ)] for the Gaussian model.

    ∇_μ J̄ = 0 gives μ = x̄; ∇_M J̄ = −I + ½(MC + CM) = 0 with C the biased sample covariance is a
    Lyapunov equation, solved in C's eigenbasis: M_ij(λ_i + λ_j) = 2δ_ij, so M = C⁻¹ (the MLE).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must have shape (N, D) with N >= 2, got {tuple(x.shape)}")
    x = x.double()
    mu = x.mean(0)
    centred = x - mu
    cov = centred.T @ centred / x.shape[0]
    lam, u = torch.linalg.eigh(cov)
    if lam.min() <= 0:
        raise ValueError("the sample covariance is singular: need more samples than dimensions, without duplicates")
    rhs = 2 * torch.eye(x.shape[1], dtype=x.dtype)  # Uᵀ(2I)U = 2I
    m_eig = rhs / (lam[:, None] + lam[None, :])
    return mu, u @ m_eig @ u.T


def gaussian_score(x: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """ψ(x; μ, M) = −M(x − μ), the score of N(μ, M⁻¹)."""
    return -(x - mu) @ precision.T


def ica_sample(n: int, mixing: torch.Tensor, generator: torch.Generator | None = None, laplace_fraction: float = 0.0) -> torch.Tensor:
    """n samples x = A s with i.i.d. unit-variance logistic sources s (the basic ICA model); with ``laplace_fraction``
    > 0 each source value is drawn from a unit-variance Laplace density with that probability, so the model's logistic
    density is misspecified (Hyvärinen 2005, Fig. 2)."""
    shape = (n, mixing.shape[1])
    u = torch.rand(shape, dtype=torch.float64, generator=generator).clamp(1e-12, 1 - 1e-12)
    s = torch.log(u / (1 - u)) / (2 * _C)  # logistic with scale √3/π has variance 1
    if laplace_fraction > 0:
        v = torch.rand(shape, dtype=torch.float64, generator=generator) - 0.5
        laplace = -torch.sign(v) * torch.log1p(-2 * v.abs()) / math.sqrt(2)  # scale 1/√2: variance 1
        s = torch.where(torch.rand(shape, dtype=torch.float64, generator=generator) < laplace_fraction, laplace, s)
    return s @ mixing.double().T


def ica_score_matching_objective(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """J̄(W) = mean_t[Σ_k g′(w_kᵀx_t)‖w_k‖² + ½‖Σ_k w_k g(w_kᵀx_t)‖²] for ψ(x; W) = Wᵀ g(Wx)."""
    y = x @ w.T
    trace = (logistic_g_prime(y) * w.pow(2).sum(1)[None]).sum(1)
    psi = logistic_g(y) @ w
    return (trace + 0.5 * psi.pow(2).sum(1)).mean()


def ica_negative_log_likelihood(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """−mean_t[Σ_k G(w_kᵀx_t)] − log|det W|."""
    return -logistic_G(x @ w.T).sum(1).mean() - torch.linalg.slogdet(w)[1]


def _minimise(objective, x: torch.Tensor, max_iter: int) -> torch.Tensor:
    x = x.double()
    centred = x - x.mean(0)
    lam, u = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    w = (u @ torch.diag(lam.rsqrt()) @ u.T).clone().requires_grad_(True)  # start from the whitening matrix
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(w, x)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def ica_score_matching(x: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """Estimate the separating matrix W by minimising the score-matching objective (L-BFGS)."""
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    return _minimise(ica_score_matching_objective, x, max_iter)


def ica_mle(x: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """Maximum-likelihood estimate of W for the same model, the reference estimator."""
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    return _minimise(ica_negative_log_likelihood, x, max_iter)


def ica_error(w_est: torch.Tensor, w_true: torch.Tensor) -> float:
    """Frobenius distance ‖PSŴ − W‖ after the best row permutation P and signs S (Hyvärinen 2005, Fig. 1)."""
    if w_est.shape != w_true.shape:
        raise ValueError(f"w_est shape {tuple(w_est.shape)} does not match w_true shape {tuple(w_true.shape)}")
    a, b = w_est.double(), w_true.double()
    # cost[i, j]: squared error of matching estimated row i to true row j with the better sign
    plus = (a[:, None] - b[None]).pow(2).sum(-1)
    minus = (a[:, None] + b[None]).pow(2).sum(-1)
    cost = torch.minimum(plus, minus).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].sum()))

"""Score-matching objectives: exact (Hyvärinen 2005), sliced (Song et al. 2019) and denoising (NCSN)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ncsn._checks import positive_int

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
NoiseScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_score_shape(score: torch.Tensor, x: torch.Tensor) -> None:
    if score.shape != x.shape:
        raise ValueError(f"score_fn returned shape {tuple(score.shape)}, expected the input's shape {tuple(x.shape)}")


def exact_score_matching_loss(score_fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """Hyvärinen's J̄ = mean_i [Tr(∇_x ψ(x_i)) + ½‖ψ(x_i)‖²] (JMLR 2005, eq. 4); x is (N, D).

    The trace takes one backward pass per dimension, so this is for low-dimensional data.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    x = x.detach().requires_grad_(True)
    score = score_fn(x)
    _check_score_shape(score, x)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for d in range(x.shape[1]):
        (grad,) = torch.autograd.grad(score[:, d].sum(), x, create_graph=True)
        trace = trace + grad[:, d]
    return (trace + 0.5 * score.pow(2).sum(dim=1)).mean()


def sliced_score_matching_loss(
    score_fn: ScoreFn,
    x: torch.Tensor,
    n_projections: int = 1,
    variance_reduction: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced score matching: E_v[vᵀ∇ψ v + ½(vᵀψ)²], v ~ N(0, I) (Song et al. 2019, eq. 7).

    With ``variance_reduction`` the second term is replaced by its expectation ½‖ψ‖² (SSM-VR).
    """
    positive_int("n_projections", n_projections)
    xs = x.detach().repeat(n_projections, *([1] * (x.dim() - 1))).requires_grad_(True)
    v = torch.randn(xs.shape, dtype=xs.dtype, device=xs.device, generator=generator)
    score = score_fn(xs)
    _check_score_shape(score, xs)
    score_v = (score * v).flatten(1).sum(dim=1)
    (grad_v,) = torch.autograd.grad(score_v.sum(), xs, create_graph=True)
    jvp_term = (grad_v * v).flatten(1).sum(dim=1)
    norm_term = 0.5 * score.flatten(1).pow(2).sum(dim=1) if variance_reduction else 0.5 * score_v.pow(2)
    return (jvp_term + norm_term).mean()


@dataclass
class LevelLoss:
    """A noise-conditional loss of a batch and its break-down by noise level (DSM or sliced).

    loss: the scalar to minimise, mean over the batch of λ(σ)ℓ(θ;σ) for each sample's level.
    per_level_sum: (L,) sum of the per-sample losses that fell on each level (detached).
    per_level_count: (L,) how many samples of the batch fell on each level.
    """

    loss: torch.Tensor
    per_level_sum: torch.Tensor
    per_level_count: torch.Tensor

    @property
    def per_level_mean(self) -> torch.Tensor:
        """Mean loss per level; NaN for levels no sample fell on."""
        return self.per_level_sum / self.per_level_count.to(self.per_level_sum.dtype)


def _draw_levels(x: torch.Tensor, sigmas: torch.Tensor, levels: torch.Tensor | None, generator: torch.Generator | None,
                 continuous: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σs on x's device and dtype, one level index per sample, each sample's σ). The level is drawn uniformly (or given
    as ``levels``) and σ is that level's; ``continuous``: σ is drawn log-uniformly between σ_L and σ_1 (score_sde's
    continuous VE training) and the level is the nearest one in log σ, for the per-level breakdown."""
    if sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    if continuous:
        if levels is not None:
            raise ValueError("levels are drawn, not given, with continuous σ")
        u = torch.rand((x.shape[0],), device=x.device, dtype=x.dtype, generator=generator)
        sigma = (sigmas[-1].log() + u * (sigmas[0].log() - sigmas[-1].log())).exp()
        return sigmas, (sigma.log()[:, None] - sigmas.log()[None]).abs().argmin(1), sigma
    if levels is None:
        levels = torch.randint(0, sigmas.numel(), (x.shape[0],), device=x.device, generator=generator)
    elif levels.shape != (x.shape[0],):
        raise ValueError(f"levels must have shape ({x.shape[0]},), got {tuple(levels.shape)}")
    return sigmas, levels, sigmas[levels]


def _level_loss(per_sample: torch.Tensor, levels: torch.Tensor, num_levels: int) -> LevelLoss:
    detached = per_sample.detach().float()
    per_level_sum = torch.zeros(num_levels, device=per_sample.device).index_add_(0, levels, detached)
    return LevelLoss(per_sample.mean(), per_level_sum, torch.bincount(levels, minlength=num_levels))


def dsm_loss(
    score_fn: NoiseScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    continuous: bool = False,
) -> LevelLoss:
    """NCSN's objective: ½ E‖s(x̃,σ) + (x̃−x)/σ²‖² weighted by λ(σ)=σ² (Song & Ermon 2019, eqs. 5–6).

    Each sample gets one level drawn uniformly (or ``levels``, (B,) indices into ``sigmas``), or with ``continuous`` a σ
    log-uniform between σ_L and σ_1. With x̃ = x + σz the weighted per-sample loss is ½‖σ s(x̃,σ) + z‖².
    """
    sigmas, levels, sigma = _draw_levels(x, sigmas, levels, generator, continuous)
    sigma_b = sigma.view(-1, *([1] * (x.dim() - 1)))
    z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    score = score_fn(x + sigma_b * z, sigma)
    _check_score_shape(score, x)
    per_sample = 0.5 * (sigma_b * score + z).flatten(1).pow(2).sum(dim=1)
    return _level_loss(per_sample, levels, sigmas.numel())


def sliced_level_loss(
    score_fn: NoiseScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    continuous: bool = False,
) -> LevelLoss:
    """Noise-conditional sliced score matching with variance reduction on x̃ = x + σz, weighted by λ(σ)=σ²:
    σ²[vᵀ∇_x̃(vᵀs(x̃,σ)) + ½‖s(x̃,σ)‖²], v ~ N(0, I) (Song et al. 2019, eq. 8; NCSN §3.2, eq. 6's weighting); σ drawn
    as in dsm_loss."""
    sigmas, levels, sigma = _draw_levels(x, sigmas, levels, generator, continuous)
    sigma_b = sigma.view(-1, *([1] * (x.dim() - 1)))
    noisy = (x + sigma_b * torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)).detach().requires_grad_(True)
    v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    score = score_fn(noisy, sigma)
    _check_score_shape(score, x)
    (grad_v,) = torch.autograd.grad((score * v).sum(), noisy, create_graph=True)
    per_sample = ((grad_v * v).flatten(1).sum(dim=1) + 0.5 * score.flatten(1).pow(2).sum(dim=1)) * sigma**2
    return _level_loss(per_sample, levels, sigmas.numel())


LEVEL_LOSSES = {"dsm": dsm_loss, "ssm": sliced_level_loss}

"""The NCSN paper's toy experiment (Figure 3): weights of two separated modes under Langevin samplers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ncsn.sampling import annealed_langevin_dynamics, langevin_dynamics
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import GaussianMixture


def paper_mixture() -> GaussianMixture:
    """p = 1/5 N((−5,−5), I) + 4/5 N((5,5), I), the mixture of NCSN §3.2.3."""
    return GaussianMixture(means=[[-5.0, -5.0], [5.0, 5.0]], stds=[1.0, 1.0], weights=[0.2, 0.8])


def lower_left_fraction(x: torch.Tensor) -> float:
    """Share of 2-D points on the (−5,−5) side of the line x₁ + x₂ = 0."""
    return (x.sum(dim=1) < 0).float().mean().item()


@dataclass
class MixtureSamples:
    """Samples of the three panels of NCSN Figure 3."""

    exact: torch.Tensor
    langevin: torch.Tensor
    annealed: torch.Tensor


def mixture_experiment(score_fn=None, n: int = 5000, seed: int = 0) -> MixtureSamples:
    """Exact samples, Langevin (ε=0.1, T=1000) and annealed Langevin (σ 20→1, L=10, ε=0.1, T=100) from
    uniform noise on [−8, 8]², the settings of NCSN §3.2.3; ``score_fn(x, σ)`` defaults to the exact score."""
    mixture = paper_mixture()
    score_fn = score_fn or mixture.score
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(n, 2, generator=gen) * 16 - 8
    langevin = langevin_dynamics(lambda x: score_fn(x, torch.zeros(x.shape[0])), start, 0.1, 1000, generator=gen)
    sigmas = geometric_sigmas(20.0, 1.0, 10)
    annealed = annealed_langevin_dynamics(score_fn, start, sigmas, eps=0.1, steps_per_level=100, generator=gen).samples
    return MixtureSamples(mixture.sample(n, generator=gen), langevin, annealed)

"""Toy problems with known scores: a Gaussian mixture (NCSN Figure 3) and a small score MLP for 2-D data."""
from __future__ import annotations

import math

import torch
from torch import nn

from ncsn._checks import positive_int
from ncsn.losses import dsm_loss


class GaussianMixture:
    """Σ_k w_k N(μ_k, s_k² I), with exact samples and the exact score of its σ-perturbed version."""

    def __init__(self, means: torch.Tensor | list, stds: torch.Tensor | list, weights: torch.Tensor | list):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        k = self.means.shape[0]
        if self.means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        if self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(
                f"stds and weights must have shape ({k},) to match means, got {tuple(self.stds.shape)} and {tuple(self.weights.shape)}"
            )
        if (self.stds <= 0).any():
            raise ValueError("stds must all be > 0")
        if (self.weights < 0).any() or not math.isclose(self.weights.sum().item(), 1.0, rel_tol=1e-6):
            raise ValueError(f"weights must be >= 0 and sum to 1, got {self.weights.tolist()}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples, float32, shape (n, D)."""
        positive_int("n", n)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[comp] + self.stds[comp, None] * noise).float()

    def _log_components(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # (B or 1, 1)
        var = self.stds.pow(2)[None, :] + sigma.pow(2)  # (B, K)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1)  # (B, K)
        log_comp = self.weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return log_comp, var

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log q_σ(x) of the mixture convolved with N(0, σ²I)."""
        log_comp, _ = self._log_components(x, sigma)
        return torch.logsumexp(log_comp, dim=1).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """∇_x log q_σ(x) = Σ_k r_k(x) (μ_k − x)/(s_k² + σ²), r_k the posterior responsibilities."""
        log_comp, var = self._log_components(x, sigma)
        resp = torch.softmax(log_comp, dim=1)  # (B, K)
        diff = self.means[None] - x.double()[:, None, :]  # (B, K, D)
        return (resp[..., None] * diff / var[..., None]).sum(1).to(x.dtype)


class NoiseConditionalMLP(nn.Module):
    """s_θ(x, σ) = f_θ(x, log σ)/σ for low-dimensional data (the 1/σ output scaling of NCSNv2)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        positive_int("dim", dim)
        positive_int("hidden", hidden)
        positive_int("depth", depth)
        layers: list[nn.Module] = [nn.Linear(dim + 1, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1)
        return self.net(torch.cat([x, sigma.log().expand(x.shape[0], 1)], dim=1)) / sigma


def train_toy_score_model(
    mixture: GaussianMixture,
    sigmas: torch.Tensor,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
) -> NoiseConditionalMLP:
    """Fit a NoiseConditionalMLP to ``mixture`` with dsm_loss over ``sigmas`` (fresh samples each step)."""
    positive_int("steps", steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = NoiseConditionalMLP(dim=mixture.dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = dsm_loss(model, mixture.sample(batch_size, generator=gen), sigmas, generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()

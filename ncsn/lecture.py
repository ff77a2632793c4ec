"""The lecture's remaining experiments, each a small function returning the numbers its figure shows: score matching vs
maximum likelihood for ICA (correct and misspecified source density; Hyvärinen 2005, Figs. 1–2), overcomplete ICA of
natural-image patches by score matching (Figs. 3–4), sliced score matching on a low-dimensional manifold (NCSN Fig. 1)
and scores learned in low-density regions (NCSN Fig. 2). Pure PyTorch; drawing is ncsn.figures'."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ncsn.classical import ica_error, ica_mle, ica_sample, ica_score_matching, logistic_g, logistic_g_prime
from ncsn.experiments import paper_mixture
from ncsn.losses import sliced_score_matching_loss


@dataclass(frozen=True)
class ErrorCurves:
    """Median estimation error of score matching and maximum likelihood at each sample size."""

    sizes: list[int]
    score_matching: list[float]
    maximum_likelihood: list[float]
    laplace_fraction: float

    def slopes(self) -> dict[str, float]:
        """Least-squares slope of log10 error against log10 n per estimator (−½ for a √n-consistent one)."""
        x = np.log10(self.sizes)
        return {name: float(np.polyfit(x, np.log10(errors), 1)[0])
                for name, errors in (("score_matching", self.score_matching), ("maximum_likelihood", self.maximum_likelihood))}

    def last_ratios(self) -> dict[str, float]:
        """Error at the largest n over error at the second largest (10^-¼ ≈ 0.56 at slope −½ for sizes ½ decade apart)."""
        return {"score_matching": self.score_matching[-1] / self.score_matching[-2],
                "maximum_likelihood": self.maximum_likelihood[-1] / self.maximum_likelihood[-2]}


def ica_error_curves(sizes: list[int], reps: int = 5, dim: int = 4, laplace_fraction: float = 0.0, seed: int = 0) -> ErrorCurves:
    """Hyvärinen (2005) Figs. 1–2: for each n, ``reps`` data sets from a random mixing of ``dim`` sources, the median
    error ‖PSŴ − W‖ of the score-matching and the maximum-likelihood estimates of W."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, dtype=torch.float64, generator=gen)
    w_true = torch.linalg.inv(mixing)
    sm, ml = [], []
    for n in sizes:
        errors = [(ica_error(ica_score_matching(x), w_true), ica_error(ica_mle(x), w_true))
                  for x in (ica_sample(n, mixing, gen, laplace_fraction) for _ in range(reps))]
        sm.append(statistics.median(e[0] for e in errors))
        ml.append(statistics.median(e[1] for e in errors))
    return ErrorCurves(list(sizes), sm, ml, laplace_fraction)


def image_patches(images: list[np.ndarray], size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``size``×``size`` grey patches (N, size²) from uint8 RGB photographs, each patch's mean removed."""
    grey = [torch.from_numpy(im.astype(np.float32)).mean(-1) for im in images]
    which = torch.randint(0, len(grey), (n,), generator=generator)
    patches = []
    for k, g in enumerate(grey):
        count = int((which == k).sum())
        rows = torch.randint(0, g.shape[0] - size + 1, (count,), generator=generator)
        cols = torch.randint(0, g.shape[1] - size + 1, (count,), generator=generator)
        offsets = torch.arange(size)
        index_r = (rows[:, None] + offsets)[:, :, None].expand(-1, size, size)
        index_c = (cols[:, None] + offsets)[:, None, :].expand(-1, size, size)
        patches.append(g[index_r, index_c].reshape(count, -1))
    x = torch.cat(patches)
    return x - x.mean(1, keepdim=True)


def whiten(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening of centred rows: (z with identity covariance in the p non-degenerate directions, the p × D matrix
    V with z = x Vᵀ). A filter w in the whitened space is the pixel-space filter Vᵀw."""
    cov = x.T @ x / len(x)
    values, vectors = torch.linalg.eigh(cov)
    keep = values > 1e-6 * values.max()  # removing each patch's mean leaves one zero direction
    v = (vectors[:, keep] / values[keep].sqrt()).T
    return x @ v.T, v


def overcomplete_score(z: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ψ(z) = Σ_k α_k w_k g(w_kᵀz), the overcomplete ICA model's score (Hyvärinen 2005)."""
    return (logistic_g(z @ w.T) * alpha) @ w


def overcomplete_sm_objective(z: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """J = E[Σ_i ∂ψ_i/∂z_i + ½‖ψ‖²] with ∂ψ_i/∂z_i summed = Σ_k α_k ‖w_k‖² g′(w_kᵀz), ‖w_k‖ = 1 (Hyvärinen 2005)."""
    return (logistic_g_prime(z @ w.T) * alpha).sum(1).mean() + 0.5 * overcomplete_score(z, w, alpha).pow(2).sum(1).mean()


@dataclass(frozen=True)
class OvercompleteFit:
    """Unit-norm filters W (components × p) in the whitened space, their weights α, and the objective before and after."""

    w: torch.Tensor
    alpha: torch.Tensor
    objective_start: float
    objective_end: float


def overcomplete_ica(z: torch.Tensor, components: int, steps: int = 400, lr: float = 0.02, seed: int = 0) -> OvercompleteFit:
    """Filters and weights minimising the score-matching objective on whitened data (Adam on W = V/‖V‖ row-wise, from
    random unit filters): no normalising constant is ever computed, the point of the example."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(components, z.shape[1], generator=gen, dtype=z.dtype).requires_grad_(True)
    alpha = torch.ones(components, dtype=z.dtype).requires_grad_(True)
    opt = torch.optim.Adam([v, alpha], lr=lr)
    losses = []
    for _ in range(steps):
        loss = overcomplete_sm_objective(z, v / v.norm(dim=1, keepdim=True), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return OvercompleteFit((v / v.norm(dim=1, keepdim=True)).detach(), alpha.detach(), losses[0], losses[-1])


def max_dot_products(w: torch.Tensor) -> torch.Tensor:
    """For each unit filter, the largest |w_iᵀw_j| over the others (Hyvärinen 2005, Fig. 4; near 1: a copy)."""
    dots = (w @ w.T).abs()
    dots.fill_diagonal_(0)
    return dots.max(1).values


def manifold_data(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Points on a 2-D manifold in ``dim`` dimensions: (u, v) on a torus, mapped through sin/cos features and a fixed
    random linear map. Every direction off the surface has zero variance, as for images on a low-dimensional manifold."""
    gen = torch.Generator().manual_seed(seed)
    uv = torch.rand(n, 2, generator=gen) * 2 * math.pi
    features = torch.cat([torch.sin(uv), torch.cos(uv), torch.sin(2 * uv[:, :1] + uv[:, 1:])], 1)
    return features @ (torch.randn(features.shape[1], dim, generator=gen) / math.sqrt(features.shape[1]))


def _mlp(dim: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, dim))


def ssm_loss_curve(data: torch.Tensor, noise: float, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Sliced score matching (SSM-VR) losses of an MLP trained on ``data`` + N(0, noise²) (NCSN Fig. 1: noise 0 vs 0.01)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _mlp(data.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        loss = sliced_score_matching_loss(net, x + noise * torch.randn(x.shape, generator=gen), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@dataclass(frozen=True)
class ScoreField:
    """True and learned scores of the NCSN §3.2.3 mixture on a grid, with the data density there."""

    grid: torch.Tensor  # (G*G, 2)
    true: torch.Tensor
    learned: torch.Tensor
    log_density: torch.Tensor

    def error_by_density(self) -> dict[str, float]:
        """Mean squared score error over the lowest- and highest-density thirds of the grid, and their ratio."""
        order = self.log_density.argsort()
        third = len(order) // 3
        err = (self.learned - self.true).pow(2).sum(1)
        low, high = float(err[order[:third]].mean()), float(err[order[-third:]].mean())
        return {"low_density_mse": low, "high_density_mse": high, "ratio": low / high}


def low_density_scores(n: int = 10000, steps: int = 2000, grid: int = 41, seed: int = 0) -> ScoreField:
    """NCSN Fig. 2: an MLP fitted by sliced score matching to ``n`` samples of the mixture, beside the true score on a
    grid over [−8, 8]²: accurate near the modes, where the samples are, and wrong between and beyond them."""
    mixture = paper_mixture()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = mixture.sample(n, generator=gen).float()
    net = _mlp(2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = sliced_score_matching_loss(net, data[torch.randint(0, n, (256,), generator=gen)], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    axis = torch.linspace(-8, 8, grid)
    points = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        learned = net(points)
    return ScoreField(points, mixture.score(points).float(), learned, mixture.log_prob(points).float())

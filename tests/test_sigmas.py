import math

import pytest
import torch

from ncsn.sigmas import (
    gamma_for_dimension,
    geometric_sigmas,
    langevin_variance_ratio,
    max_pairwise_distance,
    recommend_schedule,
)


def test_geometric_sigmas_descending_constant_ratio():
    s = geometric_sigmas(1.0, 0.01, 10)
    assert s.shape == (10,)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[:-1] / s[1:]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    assert ratios[0].item() == pytest.approx(100 ** (1 / 9), rel=1e-5)


@pytest.mark.parametrize(
    "args, name",
    [((0.01, 1.0, 10), "sigma_min"), ((1.0, 1.0, 10), "sigma_min"), ((1.0, 0.1, 0), "num_levels"),
     ((-1.0, 0.1, 3), "sigma_max"), ((1.0, float("nan"), 3), "sigma_min"), ((1.0, 0.1, 2.5), "num_levels")],
)
def test_geometric_sigmas_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        geometric_sigmas(*args)


def test_gamma_satisfies_gaussian_cdf_condition():
    d = 3072
    g = gamma_for_dimension(d)
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    a = math.sqrt(2 * d) * (g - 1)
    assert phi(a + 3 * g) - phi(a - 3 * g) == pytest.approx(0.5, abs=1e-9)


def test_recommend_schedule_reproduces_ncsnv2_cifar10():
    # NCSNv2 (Song & Ermon 2020, Table/appendix): CIFAR-10 σ_1 = 50, L = 232, T = 5, ε = 6.2e-6 with
    # the update x + ε s + √(2ε) z, i.e. ε = 1.24e-5 in Algorithm 1's (ε/2, √ε) convention used here.
    r = recommend_schedule(None, steps_per_level=5, sigma_min=0.01, sigma_max=50.0, dim=3 * 32 * 32)
    assert 200 <= r.num_levels <= 240
    assert r.eps == pytest.approx(1.24e-5, rel=0.1)
    assert r.gamma <= r.gamma_target
    assert r.sigmas()[0].item() == pytest.approx(50.0) and r.sigmas()[-1].item() == pytest.approx(0.01)


def test_recommended_step_size_gives_the_best_variance_ratio():
    r = recommend_schedule(None, steps_per_level=100, sigma_min=0.01, sigma_max=10.0, dim=64)
    assert abs(r.variance_ratio - 1) < 0.05  # c = 1/(1 − r/4) > 1 keeps it a little above 1
    for factor in (0.5, 2.0):
        other = langevin_variance_ratio(r.eps * factor, r.gamma, r.sigma_min, 100)
        assert abs(other - 1) >= abs(r.variance_ratio - 1)


def test_variance_ratio_matches_simulated_langevin(gen):
    # The closed form is the variance of Algorithm 1 on a point mass (q_σ = N(0, σ²)): simulate it.
    sigma_i, sigma_l, gamma, eps, steps = 0.5, 0.1, 1.3, 2e-4, 50
    x = torch.randn(200_000, dtype=torch.float64, generator=gen) * gamma * sigma_i
    alpha = eps * sigma_i**2 / sigma_l**2
    for _ in range(steps):
        x = x + 0.5 * alpha * (-x / sigma_i**2) + math.sqrt(alpha) * torch.randn(x.shape, dtype=x.dtype, generator=gen)
    assert (x.var() / sigma_i**2).item() == pytest.approx(langevin_variance_ratio(eps, gamma, sigma_l, steps), rel=0.02)


def test_max_pairwise_distance_and_schedule_from_data(gen):
    data = torch.rand(300, 1, 4, 4, generator=gen)
    data[7] = 0.0
    data[123] = 1.0
    assert max_pairwise_distance(data) == pytest.approx(4.0)  # ‖1 − 0‖ over 16 pixels
    r = recommend_schedule(data, steps_per_level=10)
    assert r.dim == 16 and r.sigma_max == pytest.approx(4.0)


def test_max_pairwise_distance_is_exact_across_chunks(gen):
    # Brute force over every pair; chunk sizes that split the extreme pair across blocks (and the cross form a, b).
    data = torch.rand(57, 10, generator=gen, dtype=torch.float64)
    brute = torch.cdist(data, data).max().item()
    for chunk in (1, 5, 56, 57, 1000):
        assert max_pairwise_distance(data, chunk=chunk) == pytest.approx(brute, rel=1e-12)
    a, b = data[:20], data[20:]
    assert max_pairwise_distance(a, b, chunk=7) == pytest.approx(torch.cdist(a, b).max().item(), rel=1e-12)
    # a subset can only underestimate: the exact statistic never falls below any subset's
    assert max_pairwise_distance(data[:30]) <= max_pairwise_distance(data)


@pytest.mark.parametrize("seed", range(4))
def test_max_pairwise_distance_is_exact_where_the_bound_prunes(seed):
    # Images-like rows: a few strong directions plus noise, so the projected bound prunes most pairs; with rank 2 the
    # residual holds a strong direction too, and a bound without it (or a residual added once) misses the extreme pair.
    gen = torch.Generator().manual_seed(seed)
    structure = torch.randn(700, 3, generator=gen, dtype=torch.float64) * torch.tensor([20.0, 8.0, 4.0], dtype=torch.float64)
    data = structure @ torch.randn(3, 60, generator=gen, dtype=torch.float64) + torch.randn(700, 60, generator=gen, dtype=torch.float64)
    for rank, chunk in ((2, 64), (8, 700), (64, 33)):
        assert max_pairwise_distance(data, chunk=chunk, rank=rank) == pytest.approx(torch.cdist(data, data).max().item(), rel=1e-12)
    a, b = data[:300], data[300:]
    assert max_pairwise_distance(a, b, chunk=50, rank=2) == pytest.approx(torch.cdist(a, b).max().item(), rel=1e-12)


def test_max_pairwise_distance_keeps_the_pair_its_start_misses():
    # The search starts from the point farthest from the mean (P), its farthest (W) and back: |PW| = 16. The widest pair,
    # U and V (18 apart), differs only along x, which a rank-1 basis (y, where the data spread) leaves to the residual
    # term of the bound: only a bound that keeps it finds U and V.
    spread = torch.zeros(200, 4, dtype=torch.float64)
    spread[:, 1] = torch.linspace(-2, 2, 200)
    points = torch.tensor([[0, 10, 0, 0], [0, -6, 0, 0], [-9, -3, 0, 0], [9, -3, 0, 0]], dtype=torch.float64)  # P, W, U, V
    data = torch.cat([spread, points])
    for chunk in (3, 64, 1000):
        assert max_pairwise_distance(data, chunk=chunk, rank=1) == pytest.approx(18.0, rel=1e-12)
    assert max_pairwise_distance(data[:203], data[203:], rank=1) == pytest.approx(18.0, rel=1e-12)  # V against the rest


def test_recommend_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="steps_per_level"):
        recommend_schedule(None, steps_per_level=0, sigma_max=1.0, dim=4)
    with pytest.raises(ValueError, match="sigma_min"):
        recommend_schedule(None, steps_per_level=5, sigma_min=2.0, sigma_max=1.0, dim=4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        recommend_schedule(torch.zeros(1, 3), steps_per_level=5)

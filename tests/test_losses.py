import pytest
import torch

from ncsn.classical import gaussian_score, gaussian_score_matching
from ncsn.losses import dsm_loss, exact_score_matching_loss, sliced_score_matching_loss


def _random_gaussian_data(gen, n=2000, d=3):
    a = torch.randn(d, d, dtype=torch.float64, generator=gen)
    return torch.randn(n, d, dtype=torch.float64, generator=gen) @ a.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def test_gaussian_score_matching_equals_mle(gen):
    x = _random_gaussian_data(gen)
    mu, m = gaussian_score_matching(x)
    centred = x - x.mean(0)
    mle_precision = torch.linalg.inv(centred.T @ centred / x.shape[0])
    assert torch.allclose(mu, x.mean(0), atol=1e-5)
    assert torch.allclose(m, mle_precision, atol=1e-5)


def test_gaussian_estimate_is_a_stationary_point_of_exact_sm(gen):
    x = _random_gaussian_data(gen)
    mu, m = gaussian_score_matching(x)
    mu.requires_grad_(True)
    m.requires_grad_(True)
    loss = exact_score_matching_loss(lambda y: gaussian_score(y, mu, m), x)
    g_mu, g_m = torch.autograd.grad(loss, [mu, m])
    assert g_mu.abs().max() < 1e-8 and g_m.abs().max() < 1e-8


def test_exact_sm_loss_equals_gaussian_closed_form(gen):
    x = _random_gaussian_data(gen, n=500)
    mu = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    b = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    m = b @ b.T + torch.eye(3, dtype=torch.float64)
    closed = (-torch.trace(m) + 0.5 * ((x - mu) @ m @ m * (x - mu)).sum(1)).mean()  # −Tr M + ½(x−μ)ᵀMM(x−μ)
    assert exact_score_matching_loss(lambda y: gaussian_score(y, mu, m), x).item() == pytest.approx(closed.item(), rel=1e-10)


@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_sm_agrees_with_exact_sm(gen, variance_reduction):
    x = _random_gaussian_data(gen, n=400)
    mu = torch.zeros(3, dtype=torch.float64)
    m = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]], dtype=torch.float64)
    fn = lambda y: gaussian_score(y, mu, m)
    exact = exact_score_matching_loss(fn, x).item()
    sliced = sliced_score_matching_loss(fn, x, n_projections=2000, variance_reduction=variance_reduction, generator=gen).item()
    # Monte-Carlo error of 800k projections is well below 2% of |J| here (|J| ≈ 10).
    assert sliced == pytest.approx(exact, rel=0.02)


def test_sliced_sm_gradient_descent_fits_a_gaussian(gen):
    x = _random_gaussian_data(gen, n=4000).float()
    mu = torch.zeros(3, requires_grad=True)
    chol = torch.eye(3, requires_grad=True)  # M = LLᵀ keeps the precision positive definite
    opt = torch.optim.Adam([mu, chol], lr=0.05)
    for _ in range(600):
        m = chol @ chol.T
        loss = sliced_score_matching_loss(lambda y: gaussian_score(y, mu, m), x, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mu_ref, m_ref = gaussian_score_matching(x)
    assert torch.allclose(mu.detach().double(), mu_ref, atol=0.1)
    m_fit = (chol @ chol.T).detach().double()
    assert (m_fit - m_ref).norm() / m_ref.norm() < 0.1


def test_dsm_loss_zero_for_exact_denoiser_on_point_mass(gen):
    # For data at a single point x0, q_σ = N(x0, σ²I) and its score −(x̃−x0)/σ² makes every term vanish.
    x = torch.zeros(64, 2)
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    out = dsm_loss(lambda xt, s: -xt / s[:, None] ** 2, x, sigmas, generator=gen)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-10)
    assert out.per_level_count.sum().item() == 64


def test_dsm_loss_of_zero_score_is_half_dimension_per_level(gen):
    # s ≡ 0 gives ½‖z‖² per sample: expectation D/2 at every level, whatever σ (the λ(σ)=σ² weighting).
    x = torch.randn(20_000, 4, generator=gen)
    sigmas = torch.tensor([10.0, 1.0, 0.01])
    out = dsm_loss(lambda xt, s: torch.zeros_like(xt), x, sigmas, generator=gen)
    assert torch.allclose(out.per_level_mean, torch.full((3,), 2.0), atol=0.1)
    levels = torch.tensor([0, 0, 2, 2])
    fixed = dsm_loss(lambda xt, s: torch.zeros_like(xt), x[:4], sigmas, levels=levels)
    assert fixed.per_level_count.tolist() == [2, 0, 2] and torch.isnan(fixed.per_level_mean[1])


@pytest.mark.parametrize("loss", ["dsm", "ssm"])
def test_continuous_sigma_is_log_uniform_between_the_ends_and_binned_to_the_nearest_level(gen, loss):
    # 20 000 draws: log σ uniform on [log 0.01, log 10] (quartiles within 0.02 of the range; a draw's quartile has sd ≈ 0.003),
    # the network sees σ between the levels, and each sample's per-level bin is the level nearest its σ in log.
    from ncsn.losses import LEVEL_LOSSES

    sigmas, seen = torch.tensor([10.0, 1.0, 0.1, 0.01]), []

    def score(xt, s):
        seen.append(s.detach().clone())
        return 0 * xt

    out = LEVEL_LOSSES[loss](score, torch.zeros(20_000, 2), sigmas, generator=gen, continuous=True)
    drawn = seen[0]
    u = (drawn.log() - sigmas[-1].log()) / (sigmas[0].log() - sigmas[-1].log())
    assert u.min() >= 0 and u.max() <= 1
    assert torch.quantile(u, torch.tensor([0.25, 0.5, 0.75])).tolist() == pytest.approx([0.25, 0.5, 0.75], abs=0.02)
    assert not torch.isclose(drawn[:, None], sigmas[None], rtol=1e-4).any(1).all()  # between the levels
    # the end levels take half a bin each (1/6 of the draws), the inner ones a whole bin (1/3)
    assert (out.per_level_count / 20_000).tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6], abs=0.015)
    with pytest.raises(ValueError, match="levels are drawn, not given, with continuous σ"):
        LEVEL_LOSSES[loss](score, torch.zeros(4, 2), sigmas, levels=torch.zeros(4, dtype=torch.long), continuous=True)


def test_losses_reject_shape_mismatch(gen):
    with pytest.raises(ValueError, match="score_fn returned shape"):
        dsm_loss(lambda xt, s: xt[:, :1], torch.zeros(4, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="levels"):
        dsm_loss(lambda xt, s: xt, torch.zeros(4, 2), torch.tensor([1.0]), levels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="sigmas"):
        dsm_loss(lambda xt, s: xt, torch.zeros(4, 2), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\)"):
        exact_score_matching_loss(lambda y: y, torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_score_matching_loss(lambda y: y, torch.zeros(4, 2), n_projections=0)

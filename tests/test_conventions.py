"""The conventions the papers fix, each checked against a number that follows from their equations.

Each test names the breakage it is there to catch (all were tried on a copy of the code): a doubled Langevin
step, denoising with σ_L instead of σ_L², inpainting with unperturbed or σ_1-perturbed known pixels, an ignored
variance-reduction flag, InstanceNorm++ without its α term, inputs not centred by 2x − 1, a mis-scaled logistic
ICA source, and the noise-conditional losses' λ(σ) = σ² weighting.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from ncsn.classical import ica_sample, logistic_G, logistic_g, logistic_g_prime
from ncsn.losses import dsm_loss, sliced_level_loss, sliced_score_matching_loss
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.models.normalization import InstanceNorm2dPlus
from ncsn.models.refinenet import ChainedResidualPooling
from ncsn.sampling import annealed_langevin_dynamics, inpaint
from ncsn.sigmas import geometric_sigmas


def _stationary_variance(alpha: float, precision: float) -> float:
    """Var of x' = x + (α/2)(−P x) + √α z at stationarity: α / (1 − (1 − αP/2)²) = 1 / (P (1 − αP/4))."""
    return 1.0 / (precision * (1.0 - alpha * precision / 4.0))


def test_annealed_langevin_step_is_algorithm_1s(gen):
    # Algorithm 1: x ← x + (α_i/2) s + √α_i z with α_i = ε σ_i²/σ_L². On a Gaussian score −x/τ² the chain's
    # stationary variance is a closed form of α_i; the official code's x + α s + √(2α) z (step_lr = ε/2 here)
    # read with ε in place of step_lr doubles α and moves both levels' variances far outside the tolerance.
    tau2, eps, sigmas = 1.0, 0.5, torch.tensor([2.0, 1.0])  # α_1 = ε·4 = 2, α_2 = ε = 0.5
    x = torch.zeros(20_000, 2, dtype=torch.float64)
    out = annealed_langevin_dynamics(lambda y, s: -y / tau2, x, sigmas, eps, steps_per_level=60, trajectory_every=60,
                                     generator=gen)
    after_level_1, after_level_2 = out.trajectory[1], out.trajectory[2]
    assert after_level_1.var().item() == pytest.approx(_stationary_variance(2.0, 1 / tau2), rel=0.03)  # = 2
    assert after_level_2.var().item() == pytest.approx(_stationary_variance(0.5, 1 / tau2), rel=0.03)  # = 8/7


def test_denoising_step_is_tweedies_x_plus_sigma_L_squared_score(gen):
    # Data y ~ N(0, s²I), x = y + σ_L z: Tweedie gives E[y|x] = x + σ_L² ∇log q(x) = x·s²/(s² + σ_L²).
    # With T = 1 and a tiny ε the chain barely moves, so the denoised output is that posterior mean of its input.
    s2, sigma_l = 1.0, 0.5
    x = torch.randn(1000, 3, dtype=torch.float64, generator=gen)
    score = lambda y, s: -y / (s2 + s[:, None] ** 2)  # the exact score of q_σ = N(0, (s² + σ²) I)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = annealed_langevin_dynamics(score, x, torch.tensor([sigma_l]), 1e-12, 1, denoise=False, generator=g1).samples
    denoised = annealed_langevin_dynamics(score, x, torch.tensor([sigma_l]), 1e-12, 1, denoise=True, generator=g2).samples
    assert torch.allclose(denoised, plain * s2 / (s2 + sigma_l**2), rtol=1e-9)


def test_inpainting_perturbs_known_pixels_with_the_current_level(gen):
    # Two coupled pixels with prior N(0, Σ), Σ = [[1, ρ], [ρ, 1]]; q_σ = N(0, Σ + σ²I). The known pixel at level i
    # is y₁ + σ_i z (NCSN §5). At the last level σ_L the unknown pixel x₂ given x₁ is Gaussian with mean −P₂₁x₁/P₂₂
    # and the discretised-chain variance 1/(P₂₂(1 − εP₂₂/4)) (P = (Σ + σ_L²I)⁻¹); over the draws of z, x₁ itself
    # varies by σ_L², which adds (P₂₁/P₂₂)²σ_L². Unperturbed known pixels drop that term; σ_1-perturbed ones use σ_1².
    rho, sigma_1, sigma_l, eps, y1 = 0.98, 3.0, 1.0, 0.02, 0.7
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)

    def score(x, s):
        precision = torch.linalg.inv(cov[None] + s[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))
        return -(precision @ x[..., None])[..., 0]

    image = torch.tensor([[y1, 0.0]], dtype=torch.float64).expand(40_000, 2)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
    filled = inpaint(score, image, mask, torch.tensor([sigma_1, sigma_l]), eps, steps_per_level=800, generator=gen)
    p = torch.linalg.inv(cov + sigma_l**2 * torch.eye(2, dtype=torch.float64))
    slope = (-p[1, 0] / p[1, 1]).item()
    expected_var = _stationary_variance(eps, p[1, 1].item()) + slope**2 * sigma_l**2
    assert filled[:, 0].eq(y1).all()  # the known pixel comes back exactly
    assert filled[:, 1].mean().item() == pytest.approx(slope * y1, abs=0.03)
    assert filled[:, 1].var().item() == pytest.approx(expected_var, rel=0.04)
    wrong = {"unperturbed": _stationary_variance(eps, p[1, 1].item()),
             "sigma_1": _stationary_variance(eps, p[1, 1].item()) + slope**2 * sigma_1**2}
    for value in wrong.values():  # the two broken conventions are far outside the tolerance (unperturbed: 16% off)
        assert abs(value - expected_var) > 0.12 * expected_var


def test_variance_reduction_flag_changes_the_estimator(gen):
    # For ψ(x) = −Mx: vᵀ∇ψ v = −vᵀMv exactly; the second term is ½‖ψ‖² with variance reduction, ½(vᵀψ)² without.
    m = torch.tensor([[2.0, 0.7, 0.0], [0.7, 1.0, 0.4], [0.0, 0.4, 0.5]], dtype=torch.float64)  # couples dimensions
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    psi = lambda y: -y @ m
    state = gen.get_state()
    v = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    for vr in (True, False):
        gen.set_state(state)
        got = sliced_score_matching_loss(psi, x, n_projections=1, variance_reduction=vr, generator=gen).item()
        second = 0.5 * psi(x).pow(2).sum(1) if vr else 0.5 * (v * psi(x)).sum(1).pow(2)
        assert got == pytest.approx((-(v @ m * v).sum(1) + second).mean().item(), rel=1e-12)


def _gaussian_level_losses(loss_fn, c: torch.Tensor, sigmas: torch.Tensor, s2: float, dim: int, gen) -> torch.Tensor:
    """Per-level mean of ``loss_fn`` for data N(0, s²I) and the linear score −x̃/c_i at level i."""
    x = math.sqrt(s2) * torch.randn(len(sigmas) * 70_000, dim, dtype=torch.float64, generator=gen)
    levels = torch.arange(len(sigmas)).repeat(len(x) // len(sigmas))
    return loss_fn(lambda y, s: -y / c[levels][:, None], x, sigmas, levels=levels, generator=gen).per_level_mean.double()


def test_noise_conditional_sliced_loss_equals_its_gaussian_closed_form(gen):
    # q_σ = N(0, (s² + σ²)I); with s(x̃, σ_i) = −x̃/c_i the σ²-weighted SSM-VR objective is σ_i²(−D/c_i + ½D(s² + σ_i²)/c_i²),
    # minimised at c_i = s² + σ_i². DSM differs from it by exactly D/2 at every level (Vincent 2011 with λ = σ²).
    s2, dim = 0.5, 4
    sigmas = torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64)
    c = torch.tensor([3.0, 1.2, 0.2], dtype=torch.float64)
    closed = sigmas**2 * (-dim / c + 0.5 * dim * (s2 + sigmas**2) / c**2)
    ssm = _gaussian_level_losses(sliced_level_loss, c, sigmas, s2, dim, gen)
    dsm = _gaussian_level_losses(dsm_loss, c, sigmas, s2, dim, gen)
    assert torch.allclose(ssm, closed, rtol=0.03, atol=0.02)
    assert torch.allclose(dsm - ssm, torch.full_like(ssm, dim / 2), atol=0.05)
    best = _gaussian_level_losses(sliced_level_loss, s2 + sigmas**2, sigmas, s2, dim, gen)
    assert (best < ssm).all()  # the true perturbed score beats the wrong c at every level


def test_instance_norm_plus_follows_the_appendix_formula(gen):
    # NCSN appendix A.1 with m, v the mean and standard deviation of the channel means μ_k, in the form the published
    # code (ermongroup/ncsn ConditionalInstanceNorm2dPlus) computes it: z_k = γ_k((x_k − μ_k)/s_k + α_k(μ_k − m)/v) + β_k.
    # Dropping the α term (a plain conditional instance norm) fails this.
    norm = InstanceNorm2dPlus(4, num_classes=3)
    with torch.no_grad():
        norm.embed.weight.copy_(torch.randn(3, 12, generator=gen))
    x = torch.randn(2, 4, 5, 5, generator=gen) + torch.arange(4.0)[None, :, None, None]  # channel means differ
    y = torch.tensor([2, 0])
    gamma, alpha, beta = norm.embed.weight[y].view(2, 3, 4, 1, 1).unbind(1)
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
    m, v = mu.mean(1, keepdim=True), (mu.var(1, keepdim=True) + 1e-5).sqrt()
    expected = gamma * ((x - mu) / sd + alpha * (mu - m) / v) + beta
    assert torch.allclose(norm(x, y), expected, atol=1e-5)


def test_conditional_norms_start_with_their_own_parameters_per_level():
    # The published code draws γ, α ~ N(1, 0.02) for each level (β = 0); identical rows per level would not do.
    torch.manual_seed(0)
    weight = InstanceNorm2dPlus(64, num_classes=10).embed.weight.detach()
    scales, shifts = weight[:, :128], weight[:, 128:]
    assert not torch.allclose(scales[0], scales[1])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01) and scales.std().item() == pytest.approx(0.02, rel=0.1)
    assert shifts.eq(0).all()


@pytest.mark.parametrize("arch", ["ncsn", "ncsnv2"])
def test_inputs_are_centred_by_2x_minus_1(arch):
    # Both published networks feed 2x − 1 (images in [0, 1] mapped to [−1, 1]) to their first convolution.
    model = ScoreNetwork(ModelConfig(arch, 8, 1, 8), geometric_sigmas(1.0, 0.1, 3))
    seen = []
    model.body.begin.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.rand(2, 1, 8, 8)
    model(x, model.sigmas[:2])
    assert torch.equal(seen[0], 2 * x - 1)


def test_ncsnv2_refine_blocks_max_pool_without_norms_and_ncsn_average_pools():
    # ermongroup/ncsnv2's RefineBlock: no normalisation, CRPBlock with 5×5 max pooling; NCSN's CondCRPBlock averages.
    x = torch.rand(1, 2, 7, 7)
    for arch, pool in (("ncsnv2", F.max_pool2d), ("ncsn", F.avg_pool2d)):
        crp = ScoreNetwork(ModelConfig(arch, 8, 1, 8), geometric_sigmas(1.0, 0.1, 3)).body.refine[0].crp
        assert isinstance(crp, ChainedResidualPooling)
        if arch == "ncsnv2":
            assert not any(isinstance(m, InstanceNorm2dPlus) for m in ScoreNetwork(ModelConfig(arch, 8, 1, 8), torch.ones(1))
                           .body.refine.modules())
        probe = ChainedResidualPooling(2, None, norms=False, pool="max" if arch == "ncsnv2" else "avg", n_stages=1)
        with torch.no_grad():
            probe.convs[0].weight.zero_()
            probe.convs[0].weight[:, :, 1, 1] = torch.eye(2)  # an identity convolution isolates the pooling
        h = F.elu(x)
        assert torch.allclose(probe(x, None), h + pool(h, 5, stride=1, padding=2), atol=1e-6)
        assert crp.pool is pool


def test_logistic_ica_source_has_unit_variance_and_a_normalised_density(gen):
    # Hyvärinen 2005 §3.2: G is the log-density of a logistic source scaled to unit variance (π/(2√3) inside the cosh).
    s = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    density = logistic_G(s).exp()
    ds = (s[1] - s[0]).item()
    assert (density.sum() * ds).item() == pytest.approx(1.0, abs=1e-6)
    assert ((s**2 * density).sum() * ds).item() == pytest.approx(1.0, abs=1e-6)
    samples = ica_sample(200_000, torch.eye(2, dtype=torch.float64), generator=gen)
    assert samples.var(0).tolist() == pytest.approx([1.0, 1.0], rel=0.02)
    t = torch.linspace(-3, 3, 12, dtype=torch.float64, requires_grad=True)  # |a| has no second derivative at 0
    (g,) = torch.autograd.grad(logistic_G(t).sum(), t, create_graph=True)
    (g_prime,) = torch.autograd.grad(g.sum(), t)
    assert torch.allclose(logistic_g(t), g) and torch.allclose(logistic_g_prime(t), g_prime)

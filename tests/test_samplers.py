"""The samplers of fewer network evaluations on exact scores: predictor–corrector (score_sde) and EDM's Euler / Heun
solvers of the probability-flow ODE, their σ grids and their NFE counts."""
import math

import pytest
import torch

from ncsn.sampling import _StepNoise, edm_sampler, nfe, predictor_corrector, rho_sigmas, sample_images, sampler_grid
from ncsn.sigmas import Sampler, Schedule, geometric_sigmas
from ncsn.toy import GaussianMixture

# NCSN Figure 3's mixture: 1/5 N((-5,-5), I) + 4/5 N((5,5), I)
MIXTURE = GaussianMixture([[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0], [0.2, 0.8])


def test_heun_ode_transports_the_prior_to_the_mixture_in_39_evaluations_and_is_deterministic():
    # 20 000 draws of the exact σ_max = 80 marginal, Heun on EDM's ρ = 7 grid of 20 levels down to 0.002: 39 NFE.
    gen = torch.Generator().manual_seed(0)
    start = (MIXTURE.sample(20_000, generator=gen) + 80 * torch.randn(20_000, 2, generator=gen)).double()
    grid = rho_sigmas(80.0, 0.002, 20, 7.0).double()
    result = edm_sampler(MIXTURE.score, start, grid, heun=True)
    assert result.nfe == 39
    upper = result.samples.sum(1) > 0
    # a binomial share of 20 000 has sd √(.2·.8/20000) ≈ 0.003: 0.04 is far outside chance, so a wrong map fails
    assert upper.double().mean().item() == pytest.approx(0.8, abs=0.04)
    for part, mean in ((upper, 5.0), (~upper, -5.0)):
        assert result.samples[part].mean(0).tolist() == pytest.approx([mean, mean], abs=0.1)
        assert result.samples[part].var(0).tolist() == pytest.approx([1.0, 1.0], rel=0.1)
    assert torch.equal(edm_sampler(MIXTURE.score, start, grid, heun=True).samples, result.samples)


def test_euler_ode_with_the_same_grid_is_first_order_and_further_from_the_mixture():
    # The same 20 levels by Euler alone (20 NFE): its variance error is larger than Heun's (the 2nd-order correction matters).
    gen = torch.Generator().manual_seed(1)
    start = (MIXTURE.sample(20_000, generator=gen) + 80 * torch.randn(20_000, 2, generator=gen)).double()
    grid = rho_sigmas(80.0, 0.002, 20, 7.0).double()
    errors = {}
    for heun in (True, False):
        out = edm_sampler(MIXTURE.score, start, grid, heun=heun).samples
        upper = out.sum(1) > 0
        errors[heun] = abs(out[upper].var(0).mean().item() - 1.0)
    assert errors[True] < 0.1 < errors[False]


def test_the_corrector_step_follows_the_snr_rule_per_image():
    # Two images whose scores differ in size 100×: each corrector step is ε = 2 (r ‖z‖/‖s‖)² of its own image (a batch
    # mean of the norms, score_sde's, would give both one ε); checked to rounding against the step's own z.
    x0 = torch.tensor([[1.0, 2.0, 3.0], [0.01, -0.02, 0.03]], dtype=torch.float64)
    seen = []

    def score(x, sigma):
        seen.append(x.clone())
        return -x / sigma[:, None] ** 2

    seed, snr, sigmas = 7, 0.2, torch.tensor([1.0, 0.5], dtype=torch.float64)
    predictor_corrector(score, x0, sigmas, corrector_steps=1, snr=snr, generator=torch.Generator().manual_seed(seed))
    z = _StepNoise(torch.Generator().manual_seed(seed), x0)(x0, 4)  # the first draw: 2 levels × (1 corrector + 1 predictor) left
    s = -x0
    eps = 2 * (snr * z.norm(dim=1) / s.norm(dim=1)) ** 2
    expected = x0 + eps[:, None] * s + (2 * eps[:, None]).sqrt() * z
    assert torch.allclose(seen[1], expected, rtol=1e-12, atol=1e-14)
    assert eps[0] / eps[1] == pytest.approx((z[0].norm() / z[1].norm()).item() ** 2 * 1e-4, rel=1e-9)


def test_predictor_only_pc_follows_the_closed_form_gaussian_transition():
    # Data N(0, s0²): the exact score at σ is −x/(s0² + σ²), so one reverse-diffusion step σ_i → σ_{i+1} maps variance v to
    # a² v + d with d = σ_i² − σ_{i+1}², a = 1 − d/(s0² + σ_i²); the last step (to σ = 0) returns its mean, a² v.
    s0, n = 0.5, 200_000
    sigmas = geometric_sigmas(10.0, 0.05, 8).double()
    gen = torch.Generator().manual_seed(2)
    start = math.sqrt(s0**2 + 100.0) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    out = predictor_corrector(lambda x, s: -x / (s0**2 + s[:, None] ** 2), start, sigmas, corrector_steps=0, generator=gen)
    assert out.nfe == 8
    v, levels = s0**2 + 100.0, sigmas.tolist() + [0.0]
    for i in range(8):
        d = levels[i] ** 2 - levels[i + 1] ** 2
        v = (1 - d / (s0**2 + levels[i] ** 2)) ** 2 * v + (d if i < 7 else 0.0)
    # the sample variance of 200 000 normal draws has sd v·√(2/n) ≈ 0.3% of v
    assert out.samples.var().item() == pytest.approx(v, rel=0.015)


COUNTED = [Sampler("als"), Sampler("pc"), Sampler("pc", steps=5, corrector_steps=0), Sampler("pc", steps=4, corrector_steps=3),
           Sampler("euler", steps=6), Sampler("heun", steps=6), Sampler("heun", steps=6, churn=30.0), Sampler("heun")]


# churn on a levels-only model is refused (tested below), so that pair is not counted
@pytest.mark.parametrize("sampler, levels_only", [(s, only) for s in COUNTED for only in (False, True) if not (only and s.churn)],
                         ids=lambda v: f"{v.name}-{v.steps}-{v.corrector_steps}-{v.churn}" if isinstance(v, Sampler) else str(v))
def test_each_samplers_nfe_is_the_number_of_score_calls(sampler, levels_only):
    calls = []
    levels = geometric_sigmas(5.0, 0.05, 10)

    def score(x, sigma):
        calls.append(sigma[0].item())
        if levels_only:  # what an arch-ncsn model demands: its own levels, nothing between
            assert torch.isclose(levels, sigma[0], rtol=1e-6).any(), sigma[0].item()
        return -x

    schedule = Schedule(levels, 1e-4, 3, True, sampler)
    result = sample_images(score, (4, 1, 2, 2), schedule, trajectory_every=2, generator=torch.Generator().manual_seed(0),
                           levels_only=levels_only)
    assert result.nfe == len(calls) == nfe(schedule, levels_only) > 0
    assert result.samples.shape == (4, 1, 2, 2) and 0 <= result.samples.min() and result.samples.max() <= 1
    assert torch.equal(result.trajectory[-1].clamp(0, 1), result.samples)


def test_the_grids_and_the_closed_form_nfe():
    schedule = Schedule(geometric_sigmas(5.0, 0.05, 10), 1e-4, 3, True)
    assert nfe(schedule) == 31
    heun = Schedule(schedule.sigmas, sampler=Sampler("heun", steps=18))
    grid = sampler_grid(heun)
    assert len(grid) == 18 and grid[0].item() == pytest.approx(5.0) and grid[-1].item() == pytest.approx(0.05)
    assert (grid[:-1] - grid[1:]).diff().le(0).all()  # ρ = 7: the steps shrink towards σ_min
    assert nfe(heun) == 35
    snapped = sampler_grid(heun, levels_only=True)  # onto the 10 trained levels: at most 10, all of them levels
    assert len(snapped) <= 10 and all(torch.isclose(schedule.tensor(), s).any() for s in snapped)
    assert nfe(heun, levels_only=True) == 2 * len(snapped) - 1
    pc = Schedule(schedule.sigmas, sampler=Sampler("pc", steps=7, corrector_steps=2))
    assert torch.allclose(sampler_grid(pc), geometric_sigmas(5.0, 0.05, 7)) and nfe(pc) == 21
    with pytest.raises(ValueError, match="churn evaluates the model between its levels"):
        sampler_grid(Schedule(schedule.sigmas, sampler=Sampler("heun", steps=5, churn=10.0)), levels_only=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "ddim"}, "sampler must be one of"),
    ({"name": "als", "steps": 10}, "annealed Langevin walks the schedule's levels"),
    ({"name": "pc", "corrector_steps": -1}, "corrector_steps must be an integer >= 0"),
    ({"name": "pc", "snr": 0.0}, "snr must be a finite number > 0"),
    ({"name": "euler", "churn": 5.0}, "churn is EDM Algorithm 2's"),
    ({"name": "heun", "churn": float("nan")}, "churn must be a finite number >= 0"),
    ({"name": "heun", "steps": 0}, "sampler steps must be an integer >= 1"),
    ({"name": "heun", "s_noise": 1.007}, "s_noise shape EDM Algorithm 2's churn, which is 0 here"),
    ({"name": "heun", "churn": 10.0, "s_tmin": 0.5, "s_tmax": 0.5}, "s_tmax must be above s_tmin = 0.5"),
    ({"name": "heun", "churn": 10.0, "s_tmax": float("inf")}, "s_tmax must be a finite number > 0"),
    ({"name": "heun", "churn": 10.0, "s_noise": 0.0}, "s_noise must be a finite number > 0"),
])
def test_bad_sampler_settings_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


def test_churn_raises_only_the_levels_in_its_range_by_one_plus_gamma():
    # EDM Algorithm 2, line 4: γ = min(S_churn/N, √2 − 1) for σ_i in [S_tmin, S_tmax], else 0. The σ each step first
    # evaluates is σ̂ = (1 + γ_i) σ_i; a sampler that churned every level, or none, fails.
    grid = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    seen = []

    def score(x, sigma):
        seen.append(sigma[0].item())
        return -x / sigma[:, None] ** 2

    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    edm_sampler(score, x, grid, heun=False, churn=1.0, s_tmin=1.0, s_tmax=4.0, generator=torch.Generator().manual_seed(0))
    gamma = 1.0 / 5
    assert seen == pytest.approx([8.0, 4.0 * (1 + gamma), 2.0 * (1 + gamma), 1.0 * (1 + gamma), 0.5], rel=1e-12)


def test_churn_outside_every_level_is_the_deterministic_solver():
    gen = torch.Generator().manual_seed(2)
    start = (MIXTURE.sample(500, generator=gen) + 10 * torch.randn(500, 2, generator=gen)).double()
    grid = rho_sigmas(10.0, 0.01, 8, 7.0).double()
    plain = edm_sampler(MIXTURE.score, start, grid).samples
    for bounds in ({"s_tmin": 11.0}, {"s_tmax": 0.005}):
        churned = edm_sampler(MIXTURE.score, start, grid, churn=40.0, generator=torch.Generator().manual_seed(3), **bounds)
        assert torch.equal(churned.samples, plain)


@pytest.mark.parametrize("s_noise", [1.0, 1.5])
def test_the_churn_noise_is_scaled_by_s_noise(s_noise):
    # With a zero score the solver does not move x, so x ends at the start plus the churn noise alone:
    # variance S_noise² Σ (σ̂_i² − σ_i²) per coordinate. 40 000 draws: the variance's sd is 0.7%, the tolerance 3%;
    # a sampler that ignores S_noise is 125% off at S_noise = 1.5.
    grid = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    gamma = min(3.0 / 3, math.sqrt(2) - 1)
    x = torch.zeros(40_000, 1, dtype=torch.float64)
    out = edm_sampler(lambda x, sigma: torch.zeros_like(x), x, grid, heun=True, churn=3.0, s_noise=s_noise,
                      generator=torch.Generator().manual_seed(4)).samples
    expected = s_noise**2 * sum(((1 + gamma) ** 2 - 1) * s**2 for s in grid.tolist())
    assert out.var().item() == pytest.approx(expected, rel=0.03)


def test_a_heun_setting_reads_back_from_its_text():
    sampler = Sampler("heun", steps=11, churn=40.0, s_tmin=0.02, s_tmax=2.0, s_noise=1.007)
    assert sampler.text() == "heun:N=11,churn=40,s_tmin=0.02,s_tmax=2,s_noise=1.007"
    assert Sampler.parse(sampler.text()) == sampler
    assert Sampler.parse("heun:N=11,churn=40") == Sampler("heun", steps=11, churn=40.0)

import pytest
import torch

from ncsn.experiments import lower_left_fraction, mixture_experiment
from ncsn.sampling import annealed_langevin_dynamics, inpaint, langevin_dynamics
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import GaussianMixture


def test_mixture_score_matches_autograd_of_log_prob(gen):
    mix = GaussianMixture([[0.0, 1.0], [2.0, -1.0], [-3.0, 0.0]], [0.5, 1.0, 2.0], [0.2, 0.3, 0.5])
    x = torch.randn(50, 2, dtype=torch.float64, generator=gen).requires_grad_(True)
    for sigma in (0.0, 0.7):
        (auto,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
        assert torch.allclose(mix.score(x.detach(), sigma), auto, atol=1e-10)


def test_langevin_samples_a_gaussian(gen):
    x = torch.zeros(20_000, 2, dtype=torch.float64)
    x = langevin_dynamics(lambda y: -y / 4.0, x, step_size=0.05, n_steps=600, generator=gen)  # N(0, 4I)
    assert x.mean().abs() < 0.05
    assert x.var(0).tolist() == pytest.approx([4.0, 4.0], rel=0.05)  # discretisation bias ε/8·σ² ≈ 1%


def test_figure3_langevin_gets_weights_wrong_annealed_recovers_them():
    # 5000 samples: a binomial share has standard deviation √(.2·.8/5000) ≈ 0.006, so 0.03 is 5σ.
    out = mixture_experiment(n=5000, seed=0)
    assert lower_left_fraction(out.exact) == pytest.approx(0.2, abs=0.03)
    assert lower_left_fraction(out.annealed) == pytest.approx(0.2, abs=0.03)
    assert abs(lower_left_fraction(out.langevin) - 0.2) > 0.15  # stuck in the basin it started in (≈ 0.5)
    assert out.annealed[out.annealed.sum(1) > 0].mean(0).tolist() == pytest.approx([5.0, 5.0], abs=0.15)


def test_annealed_langevin_trajectory_and_denoise(gen):
    sigmas = geometric_sigmas(1.0, 0.1, 3)
    calls = []

    def score(x, s):
        calls.append(s[0].item())
        return -x / (1 + s[:, None] ** 2)

    out = annealed_langevin_dynamics(score, torch.zeros(4, 2), sigmas, 0.01, 5, denoise=True, trajectory_every=5, generator=gen)
    assert len(calls) == 3 * 5 + 1 and calls[-1] == pytest.approx(0.1)
    assert len(out.trajectory) == 1 + 3 + 1  # start, end of each level, after denoising
    assert torch.equal(out.trajectory[-1], out.samples)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = annealed_langevin_dynamics(score, torch.zeros(4, 2), sigmas, 0.01, 5, generator=g1).samples
    b = annealed_langevin_dynamics(score, torch.zeros(4, 2), sigmas, 0.01, 5, generator=g2).samples
    assert torch.equal(a, b)


def test_annealed_langevin_noise_is_keyed_by_the_steps_left():
    # With a zero score each step adds √α_t z_t, so the z of every step can be read off the trajectory: a sampler that
    # drops the largest level draws, with the same seed, the z of the full sampler's last steps, and the dropped steps'
    # z are not shared.
    def z_of(sigmas: torch.Tensor) -> torch.Tensor:
        out = annealed_langevin_dynamics(lambda x, s: torch.zeros_like(x), torch.zeros(8, 2, dtype=torch.float64), sigmas, 0.5, 3,
                                         trajectory_every=1, generator=torch.Generator().manual_seed(7))
        alphas = (0.5 * sigmas**2 / sigmas[-1] ** 2).repeat_interleave(3)
        return torch.diff(torch.stack(out.trajectory), dim=0) / alphas.sqrt()[:, None, None]

    full, short = z_of(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)), z_of(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(full[3:], short, atol=1e-12)
    assert (full[:3] - short[:3]).abs().min() > 0
    assert full.std().item() == pytest.approx(1.0, abs=0.2)


def test_samplers_that_end_alike_give_nearly_the_same_samples_for_one_seed():
    # Common random numbers: on N(0, I) data (score of the σ-perturbed density −x/(1 + σ²)), the full schedule and the
    # one without its 4 largest levels end within 0.01 of each other for one seed; with another seed, as far apart as two
    # independent N(0, 1) draws (E|x − y| = 2/√π ≈ 1.13). So a paired comparison of two samplers sees their difference.
    sigmas = geometric_sigmas(10.0, 0.1, 10)

    def run(s: torch.Tensor, seed: int) -> torch.Tensor:
        return annealed_langevin_dynamics(lambda x, sb: -x / (1 + sb[:, None] ** 2), torch.zeros(2000, 2, dtype=torch.float64), s, 0.01,
                                          20, generator=torch.Generator().manual_seed(seed)).samples

    a = run(sigmas, 0)
    assert (a - run(sigmas[4:], 0)).abs().mean() < 0.01
    assert (a - run(sigmas[4:], 1)).abs().mean().item() == pytest.approx(1.13, abs=0.1)


def test_inpaint_keeps_known_pixels_and_fills_unknown_from_the_model(gen):
    image = torch.rand(3, 1, 4, 4, generator=gen)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    target = 0.25
    # Score of N(0.25, (1e-4 + σ²)I): unknown pixels end within a few σ_L of 0.25, known ones untouched.
    out = inpaint(lambda x, s: (target - x) / (1e-4 + s.view(-1, 1, 1, 1) ** 2), image, mask, geometric_sigmas(1.0, 0.01, 5), 1e-4, 50, generator=gen)
    assert torch.equal(out[..., :2], image[..., :2])
    assert (out[..., 2:] - target).abs().max() < 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [({"eps": 0.0}, "eps"), ({"steps_per_level": 0}, "steps_per_level"),
     ({"sigmas": torch.tensor([0.1, 1.0])}, "decreasing"), ({"sigmas": torch.tensor([[1.0]])}, "sigmas"),
     ({"trajectory_every": 0}, "trajectory_every")],
)
def test_samplers_reject_bad_arguments(kwargs, name):
    args = {"sigmas": torch.tensor([1.0, 0.1]), "eps": 0.1, "steps_per_level": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        annealed_langevin_dynamics(lambda x, s: x, torch.zeros(2, 2), **args)


def test_inpaint_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask of shape"):
        inpaint(lambda x, s: x, torch.zeros(2, 1, 4, 4), torch.ones(3, 3), torch.tensor([1.0]), 0.1, 1)
    with pytest.raises(ValueError, match="step_size"):
        langevin_dynamics(lambda x: x, torch.zeros(2), step_size=-1.0, n_steps=3)


@pytest.mark.parametrize("n, channels, nrow, padding", [(100, 1, 10, 4), (7, 3, 3, 2), (5, 1, 10, 1)])
def test_image_grids_have_torchvisions_layout(n, channels, nrow, padding):
    # ncsn.images tiles grids itself (importing torchvision costs every worker about 2 s); the PNGs must not change
    from torchvision.utils import make_grid

    from ncsn.images import tile

    images = torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tile(images, nrow, padding, 0.5), make_grid(images, nrow=nrow, padding=padding, pad_value=0.5))

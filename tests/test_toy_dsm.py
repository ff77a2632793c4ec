import torch

from ncsn.experiments import lower_left_fraction, mixture_experiment, paper_mixture
from ncsn.sigmas import geometric_sigmas
from ncsn.toy import train_toy_score_model


def test_dsm_trained_mlp_matches_exact_perturbed_score_and_recovers_weights():
    mixture = paper_mixture()
    sigmas = geometric_sigmas(20.0, 1.0, 10)  # the levels annealed Langevin uses in mixture_experiment
    model = train_toy_score_model(mixture, sigmas, steps=3000, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sigma in sigmas.tolist():
            # test points from q_σ itself: where the sampler visits at that level
            x = mixture.sample(2000, generator=gen) + sigma * torch.randn(2000, 2, generator=gen)
            s = torch.full((2000,), sigma)
            exact = mixture.score(x, s)
            rel = (model(x, s) - exact).pow(2).sum(1).mean() / exact.pow(2).sum(1).mean()
            assert rel < 0.01, f"relative squared score error {rel:.3f} at σ={sigma:.2f}"
    with torch.no_grad():
        out = mixture_experiment(score_fn=model, n=5000, seed=0)
    assert abs(lower_left_fraction(out.annealed) - 0.2) < 0.04

import statistics

import pytest
import torch

from ncsn.classical import ica_error, ica_mle, ica_sample, ica_score_matching, ica_score_matching_objective


def _median_errors(n, mixing, reps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.linalg.inv(mixing)
    sm, mle = [], []
    for _ in range(reps):
        x = ica_sample(n, mixing, gen)
        sm.append(ica_error(ica_score_matching(x), w_true))
        mle.append(ica_error(ica_mle(x), w_true))
    return statistics.median(sm), statistics.median(mle)


def test_ica_score_matching_recovers_w_and_error_falls_like_mle():
    mixing = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sm_small, mle_small = _median_errors(1000, mixing)
    sm_large, mle_large = _median_errors(30_000, mixing)
    # Consistency: a √n rate predicts a factor √30 ≈ 5.5 between the two sizes; require at least 3.
    assert sm_small / sm_large > 3 and mle_small / mle_large > 3
    # Score matching is nearly as efficient as MLE here (Hyvärinen 2005, Fig. 1): within a factor 2.
    assert sm_large < 2 * mle_large
    assert sm_large < 0.2  # W itself, up to row order and sign, to 0.2 in Frobenius norm (‖W‖_F ≈ 3)


def test_ica_error_ignores_permutation_and_sign():
    w = torch.randn(3, 3, dtype=torch.float64)
    perm = w[[2, 0, 1]] * torch.tensor([[-1.0], [1.0], [-1.0]], dtype=torch.float64)
    assert ica_error(perm, w) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        ica_error(w[:2], w)


def test_ica_objective_is_lower_at_the_true_w_than_at_a_wrong_one():
    mixing = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = ica_sample(20_000, mixing, torch.Generator().manual_seed(4))
    w_true = torch.linalg.inv(mixing)
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))[0]
    assert ica_score_matching_objective(w_true, x) < ica_score_matching_objective(rotation @ w_true, x)

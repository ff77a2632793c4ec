"""Single-process NCSN training on real 8×8 digits produces digits.

A classifier trained on the held-out real digits (never seen by the score network) judges 500 samples:
mean max-probability ≥ 0.72 and at least 8 of 10 classes with ≥ 3% each. For scale, with this judge: the 1500
real training digits score 0.91; 500 samples of a Gaussian fitted to the data 0.62-0.65 (six draws; it fails); the
recipe's model (lr 1e-3, grad_clip 10) 0.80 (this test: the model trained on one thread, conftest's 500 samples on
seed 0); lr 2e-3 with clipping gave 0.78-0.81 for seeds 0-2 (bench/digits_recipe.py has the recipes' KIDs). The bar
sits between the two. Before the recipe clipped gradients its model scored 0.69-0.76, and the bar was 0.67; unclipped,
the network could also collapse to a zero score. The judge's regularisation is fixed (C = 10): chosen by
cross-validation on the 297 stratified held-out images it came out C = 0.3, so soft that real digits scored 0.66. (The
bar was 0.8 for the previous split and a cross-validated judge; with this judge the model sits nearer the Gaussian than
the real digits, which KID says too: 0.07 against a real-data floor of 0.)
"""
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from data_prep.sources import DigitsSource

BAR = 0.72  # mean max-probability: the trained model's samples reach it, a fitted Gaussian's do not


def _judge(samples: np.ndarray, clf) -> tuple[float, int]:
    proba = clf.predict_proba(samples.reshape(len(samples), -1))
    shares = np.bincount(proba.argmax(1), minlength=10) / len(samples)
    return float(proba.max(1).mean()), int((shares >= 0.03).sum())


@pytest.fixture(scope="module")
def classifier():
    source = DigitsSource()
    held_out = list(source.read("test", 0, source.count("test")))
    x = np.stack([r.image for r in held_out]).reshape(len(held_out), -1) / 255.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, FutureWarning, UserWarning))
        return LogisticRegression(C=10, max_iter=5000).fit(x, [r.label for r in held_out])


def test_the_judge_passes_real_digits_and_fails_a_fitted_gaussian(classifier):
    # The judge is neither trivially satisfied nor unsatisfiable: real training digits pass, a fitted Gaussian fails.
    source = DigitsSource()
    x = np.stack([r.image for r in source.read("train", 0, source.count("train"))]).reshape(-1, 64) / 255.0
    real_prob, real_classes = _judge(x, classifier)
    assert real_prob >= 0.85 and real_classes == 10
    rng = np.random.default_rng(0)
    gaussian = np.clip(rng.multivariate_normal(x.mean(0), np.cov(x.T), 500), 0, 1)
    max_prob, _ = _judge(gaussian, classifier)
    assert max_prob < BAR


@pytest.mark.slow
def test_trained_ncsn_samples_are_recognisable_digits(classifier, trained_digits_samples):
    max_prob, classes = _judge(trained_digits_samples.clamp(0, 1).numpy(), classifier)
    print(f"digits quality: mean max-probability {max_prob:.3f}, classes with >= 3%: {classes}")
    assert max_prob >= BAR
    assert classes >= 8

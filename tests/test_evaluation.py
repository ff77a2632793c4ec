"""Evaluation a tuning verdict can rest on: estimators equal to torch-fidelity's, a KID interval whose coverage holds
against a closed-form population value, FID and IS reported as a spread (never an interval with a negative bound), a
deterministic feature classifier, uniform seeded digits splits (validation held out of training), scoring any image
folder, and the verdict's statistics: selection on one split, judgement over training runs on another."""
import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.sources import DigitsSource, held_out_indices, stratified_indices
from ncsn.metrics import (Scaler, Spread, bootstrap_spread, fid_statistics, frechet_distance, frechet_distance_from_statistics,
                          inception_score, inception_score_splits, kid, kid_in_blocks, kid_subsets, mmd2_jackknife,
                          mmd2_unbiased_variance, polynomial_kernel)
from pipelines.tune.verdict import Candidate, candidates, detectable_difference, judge, select, verdict

CLI = str(Path(sys.executable).parent / "ncsn-pipeline")


def _features(rng, n, shift=0.0, d=32):
    return rng.standard_normal((n, d)) * (1 + shift) + shift


def test_estimators_equal_torch_fidelitys():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(0)
    x, y = _features(rng, 120, 0.3, d=64), _features(rng, 90, d=64)  # n·m > d²: the d × d eigenvalue form
    stats = [fid_features_to_statistics(torch.from_numpy(v)) for v in (x, y)]
    assert frechet_distance(x, y) == pytest.approx(fid_statistics_to_metric(*stats, False)["frechet_inception_distance"], rel=1e-9)
    # torch-fidelity's KID with one subset of all rows (equal set sizes) is the same U-statistic
    fidelity_kid = kid_features_to_metric(torch.from_numpy(x[:90]), torch.from_numpy(y), kid_subsets=1, kid_subset_size=90, verbose=False)
    assert kid(x[:90], y).value == pytest.approx(fidelity_kid["kernel_inception_distance_mean"], rel=1e-9)
    few, many = _features(rng, 20, 0.3, d=64), _features(rng, 30, d=64)  # n·m ≤ d²: the cross-product SVD form
    stats = [fid_features_to_statistics(torch.from_numpy(v)) for v in (few, many)]
    # (rank-deficient covariances: scipy's sqrtm behind torch-fidelity's value is the less precise one here)
    assert frechet_distance(few, many) == pytest.approx(fid_statistics_to_metric(*stats, False)["frechet_inception_distance"], rel=1e-7)
    logits = rng.standard_normal((200, 10)) * 3
    assert inception_score(logits) == pytest.approx(isc_features_to_metric(torch.from_numpy(logits), splits=1)["inception_score_mean"], rel=1e-9)
    # the published convention: IS over 10 splits in torch-fidelity's seeded order (a 203-row set: unequal parts), KID over
    # subsets drawn as torch-fidelity draws them (x's rows, then y's, per subset), FID from statistics; a wrong seed, order,
    # split boundary or ddof moves these far beyond the tolerance
    odd = rng.standard_normal((203, 10)) * 3
    published_is = isc_features_to_metric(torch.from_numpy(odd), splits=10)
    assert inception_score_splits(odd, 10, 2020) == Spread(pytest.approx(published_is["inception_score_mean"], rel=1e-12),
                                                          pytest.approx(published_is["inception_score_std"], rel=1e-9))
    assert inception_score_splits(odd, 10, 2021).value != pytest.approx(published_is["inception_score_mean"], rel=1e-6)
    published_kid = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=7, kid_subset_size=60, verbose=False)
    assert kid_subsets(x, y, 7, 60, 2020) == Spread(pytest.approx(published_kid["kernel_inception_distance_mean"], rel=1e-9),
                                                   pytest.approx(published_kid["kernel_inception_distance_std"], rel=1e-9))
    stats = [fid_features_to_statistics(torch.from_numpy(v)) for v in (x, y)]
    assert frechet_distance_from_statistics(*fid_statistics(x), *fid_statistics(y)) == pytest.approx(
        fid_statistics_to_metric(*stats, False)["frechet_inception_distance"], rel=1e-9)
    with pytest.raises(ValueError, match="KID over 1000-row subsets needs at least 1000 rows per set, got 120 and 90"):
        kid_subsets(x, y)


def test_kid_variance_estimates_unbiased_and_jackknife():
    # Over 5000 independent pairs of sets that differ: the mean of the unbiased estimates equals the variance of the KID
    # values (a formula missing a covariance term misses by far more than the 6% allowed); the jackknife is never negative
    # and exceeds it on average by about the second-order part (Efron-Stein): at these small counts half as much again.
    rng = np.random.default_rng(5)
    values, unbiased, jackknife = [], [], []
    for _ in range(5000):
        x, y = rng.standard_normal((20, 4)) * 1.2 + 0.3, rng.standard_normal((15, 4))
        kernels = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        value, variance = mmd2_jackknife(*kernels)
        values.append(value)
        jackknife.append(variance)
        unbiased.append(mmd2_unbiased_variance(*kernels))
    truth = np.var(values, ddof=1)
    assert np.mean(unbiased) == pytest.approx(truth, rel=0.06)
    assert min(jackknife) >= 0 and 1.0 < np.mean(jackknife) / truth < 1.6


def test_kid_interval_covers_the_closed_form_population_value():
    # Zero-mean Gaussians with covariances A and B: with k(a, b) = (aᵀb/d + 1)³, MMD² = 3‖A − B‖²_F / d² exactly. Over
    # 400 independent draws (16-d, 200 vs 150) the 95% interval covers it 92-97.5% of the time where A ≠ B, and at least
    # 95% where A = B (value 0; the jackknife is conservative there). The old bootstrap interval covered 99.5% of the
    # digits' draws where the model differs from the data (bench/interval_coverage.py).
    rng = np.random.default_rng(0)
    d, n, m = 16, 200, 150
    mix = rng.standard_normal((d, d)) * 0.9 / np.sqrt(d) + np.eye(d)
    rates = []
    for cov_a in (mix @ mix.T, np.eye(d)):
        truth = 3 * ((cov_a - np.eye(d)) ** 2).sum() / d**2
        root = np.linalg.cholesky(cov_a)
        covered = 0
        for _ in range(400):
            estimate = kid(rng.standard_normal((n, d)) @ root.T, rng.standard_normal((m, d)))
            covered += estimate.low <= truth <= estimate.high
        rates.append(covered / 400)
    assert 0.92 <= rates[0] <= 0.975 and rates[1] >= 0.95, rates


def test_kid_in_blocks_is_the_unbiased_statistic_of_its_blocks():
    rng = np.random.default_rng(4)
    x, y = _features(rng, 150, 0.2), _features(rng, 150)
    assert kid_in_blocks(x, y, 1000, seed=0) == pytest.approx(kid(x, y).value, rel=1e-9)
    same = [kid_in_blocks(_features(rng, 600), _features(rng, 400), 100, seed=i) for i in range(20)]  # one distribution
    assert abs(np.mean(same)) < 2 * np.std(same) / np.sqrt(len(same))  # no bias: the mean is within its standard error of 0


def test_kid_on_features_scaled_by_a_fixed_scaler_is_unbiased_and_by_the_reference_is_not():
    # A scaler fixed before the sets are drawn (here the population's own, mean 0 and sd 1) keeps KID an unbiased
    # U-statistic: over 1000 draws its mean is the closed-form value. Standardising by the reference set itself (the old
    # kid_<extractor>) puts the reference's draw into the kernel and overestimates it by about 16% here.
    rng = np.random.default_rng(7)
    d, n, m = 16, 200, 100
    mix = rng.standard_normal((d, d)) * 0.15 + np.eye(d)
    cov_a = mix @ mix.T
    truth, root, fixed = 3 * ((cov_a - np.eye(d)) ** 2).sum() / d**2, np.linalg.cholesky(cov_a), Scaler(np.zeros(d), np.ones(d))
    scaled, by_reference = [], []
    for _ in range(1000):
        x, y = rng.standard_normal((n, d)) @ root.T, rng.standard_normal((m, d))
        scaled.append(kid(fixed(x), fixed(y)).value)
        by_reference.append(kid((x - y.mean(0)) / y.std(0), (y - y.mean(0)) / y.std(0)).value)
    se = np.std(scaled) / math.sqrt(len(scaled))
    assert abs(np.mean(scaled) - truth) < 3 * se
    assert np.mean(by_reference) - truth > 10 * se
    fitted = Scaler.fit(np.hstack([x, np.ones((n, 1))]))  # a feature constant on the fitting set is left out
    assert fitted(np.hstack([y, np.zeros((m, 1))])).shape == (m, d)


def test_fid_and_is_are_a_spread_at_their_counts_not_an_interval():
    # FID is biased upwards at finite counts: for two sets of one distribution its value is well above 0, so "value ± 1.96
    # sd" would reach below 0 (the floor's old [−2.9, 14.6]); a Spread states the estimator's sd and claims no bounds.
    rng = np.random.default_rng(2)
    x, y = _features(rng, 150), _features(rng, 150)
    fid = bootstrap_spread(lambda ix, iy: frechet_distance(x[ix], y[iy]), 150, 150, 100, 0)
    assert isinstance(fid, Spread) and not hasattr(fid, "low")
    assert fid.value == pytest.approx(frechet_distance(x, y)) and fid.value > 2 * fid.sd > 0  # biased: far from the true 0
    assert str(fid).startswith(f"{fid.value:.4g} ±")
    shifted, same = kid(_features(rng, 150, 0.25), y), kid(_features(rng, 150), y)
    assert shifted.low > same.high and shifted.low > 0 and same.low <= 0 <= same.high


def test_the_digits_splits_are_uniform_seeded_and_disjoint():
    held = held_out_indices(1797, 297, seed=0)
    assert len(held) == len(set(held)) == 297 and np.array_equal(held, held_out_indices(1797, 297, seed=0))
    assert not np.array_equal(held, held_out_indices(1797, 297, seed=1))
    source = DigitsSource()
    records = {split: list(source.read(split, 0, source.count(split))) for split in ("train", "validation", "test")}
    keys = {split: {r.key for r in found} for split, found in records.items()}
    assert [len(keys[s]) for s in ("train", "validation", "test")] == [1203, 297, 297]
    assert len(keys["train"] | keys["validation"] | keys["test"]) == 1797  # disjoint, and together every digit
    assert "uniformly at random (seed 0" in source.split_rule and "never trained on" in source.validation_rule
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # the classifier's own held-out
    inner = stratified_indices(labels, 297, seed=0)  # 10% (early stopping) is stratified: every class in proportion
    assert np.all(np.abs(np.bincount(labels[inner], minlength=10) - 297 * np.bincount(labels) / len(labels)) < 1)


# ---------------------------------------------------------------- the verdict's statistics
def _candidate(trial: str, label: str, objective: float, eps: float = 1e-5) -> Candidate:
    return Candidate(trial, label, objective, f"/ckpt/{trial}", 0, eps, 5)


def test_selection_re_ranks_a_lucky_search_result_and_its_finalist_is_the_best_searched_schedule():
    # The search saw "lucky" at 0.10 (one noisy evaluation); on fresh validation seeds it is worse than "steady" and
    # `recommended`, so the finalist is "steady". When `recommended` ranks first, the best searched schedule is still the
    # finalist (the test split judges it), and the selection's own choice, the first of the ranking, is `recommended`.
    found = [_candidate("lucky", "search", 0.10), _candidate("steady", "search", 0.30), _candidate("rec", "recommended", 0.35)]
    scores = {"lucky": [0.50, 0.55, 0.45], "steady": [0.20, 0.22, 0.19], "rec": [0.40, 0.43, 0.39]}
    order, finalists = select(found, scores)
    assert [r.candidate.trial_id for r in order] == ["steady", "rec", "lucky"] and finalists == [found[1]]
    assert order[0].mean.value == pytest.approx(np.mean(scores["steady"])) and order[0].mean.low < order[0].mean.value < order[0].mean.high
    order, finalists = select(found, {**scores, "steady": [0.6, 0.6, 0.6]})
    assert order[0].candidate.trial_id == "rec" and [c.trial_id for c in finalists] == ["lucky"]
    assert verdict(order, [], "kid_std_classifier", 1000).startswith("the selection (re-scored on the validation split) ranked "
                                                                      "the recommended schedule first")
    assert [c.trial_id for c in select(found, None, finalists=2)[1]] == ["lucky", "steady"]  # by the search's own values


def test_candidates_are_the_top_trials_with_a_checkpoint_and_recommended():
    rows = [{"trial_id": t, "label": label, "objective": obj, "eps": 1e-5, "steps_per_level": 5}
            for t, label, obj in (("a", "search", 0.1), ("b", "search", 0.2), ("c", "search", 0.3), ("r", "recommended", 0.9),
                                  ("stopped", "search", 0.05), ("failed", "search", None))]
    found = candidates(rows, 2, lambda r: None if r["trial_id"] == "stopped" else f"/ckpt/{r['trial_id']}")
    assert [c.trial_id for c in found] == ["a", "b", "r"]


def test_the_verdicts_interval_widens_when_training_runs_disagree_while_sampling_seeds_agree():
    # Three training runs per schedule, three sampling seeds each. The finalist is 0.05 better on average. When the runs
    # agree, the paired t interval (2 df) excludes 0; when they disagree (training-run sd 0.05) while each network's
    # sampling seeds agree to 0.001, the interval widens and covers 0: the unit is the training run, not the seed.
    rng = np.random.default_rng(0)
    seeds = rng.standard_normal((3, 3)) * 0.001
    rec_agree = 0.30 + seeds
    fin_agree = 0.25 + seeds + rng.standard_normal((3, 1)) * 0.003
    runs = np.array([[0.0], [0.07], [-0.06]])
    rec_spread, fin_spread = rec_agree + runs, fin_agree - runs * 1.2
    agree = judge(fin_agree, rec_agree, "f", "training run")
    spread = judge(fin_spread, rec_spread, "f", "training run")
    assert agree.outcome == "beat" and spread.outcome == "not distinguishable"
    assert spread.gap.high - spread.gap.low > 10 * (agree.gap.high - agree.gap.low)
    assert spread.between_sd > 0.04 and spread.within_sd < 0.002 and spread.df == 2
    # treating the 9 sampling seeds as replicates (the old design) would call the same data a "beat"
    naive = judge(fin_spread.reshape(9, 1), rec_spread.reshape(9, 1), "f", "sampling seed")
    assert naive.gap.high - naive.gap.low < spread.gap.high - spread.gap.low


def test_judgement_attribution_and_multiplicity():
    rng = np.random.default_rng(1)
    rec = 0.30 + rng.standard_normal((4, 3)) * 0.002
    with_sampler = rec - 0.04 + rng.standard_normal((4, 3)) * 0.002  # the finalist's sampler alone buys 0.04
    fin = with_sampler - 0.02 + rng.standard_normal((4, 3)) * 0.002  # its schedule another 0.02
    one = judge(fin, rec, "f", "training run", 1, with_sampler)
    assert one.sampler_part.value == pytest.approx(-0.04, abs=0.005) and one.schedule_part.value == pytest.approx(-0.02, abs=0.005)
    assert one.gap.value == pytest.approx(one.sampler_part.value + one.schedule_part.value)
    three = judge(fin, rec, "f", "training run", 3, with_sampler)  # Bonferroni over 3 finalists: a wider interval
    assert three.level == pytest.approx(1 - 0.05 / 3) and three.gap.high - three.gap.low > one.gap.high - one.gap.low
    text = verdict([], [one], "kid_std_classifier", 1000)
    assert "paired t, 3 df" in text and "over 4 training runs per schedule" in text and "the sampler" in text
    # resolution with the t quantile of the df used: about 5.7 standard errors at 2 df, 2.8 when df is large
    assert detectable_difference(1.0, 2) == pytest.approx(5.7, abs=0.3)
    assert detectable_difference(1.0, 1000) == pytest.approx(2.8, abs=0.02)


def _simulated_job(rng, gap: float) -> str:
    """One tuning job's selection and judgement on simulated scores: 4 searched trials and `recommended`, true quality
    equal but for ``gap`` (the searched schedules better by it), training-run sd 0.02, sampling-seed sd 0.012."""
    train_sd, seed_sd = 0.02, 0.012
    truth = {"rec": 0.30, **{f"s{i}": 0.30 - gap for i in range(4)}}
    found = [_candidate(t, "recommended" if t == "rec" else "search", 0.0) for t in truth]
    networks = {t: q + rng.standard_normal() * train_sd for t, q in truth.items()}  # the search's networks
    order, finalists = select(found, {t: list(networks[t] + rng.standard_normal(3) * seed_sd) for t in truth})
    fresh = {t: truth[t] + rng.standard_normal((3, 1)) * train_sd + rng.standard_normal((3, 3)) * seed_sd
             for t in ("rec", finalists[0].trial_id)}  # retrained on 3 fresh seeds, scored on the test split
    return judge(fresh[finalists[0].trial_id], fresh["rec"], finalists[0].trial_id, "training run").outcome


def test_under_a_planted_null_the_job_says_not_distinguishable_and_finds_a_large_gap():
    rng = np.random.default_rng(2)
    null = [_simulated_job(rng, 0.0) for _ in range(400)]
    assert null.count("beat") / 400 <= 0.05  # nominal 2.5% (one side of a 95% interval)
    assert null.count("not distinguishable") >= 0.9 * 400
    real = [_simulated_job(rng, 0.12) for _ in range(200)]
    assert real.count("beat") / 200 >= 0.8


# ---------------------------------------------------------------- on the digits shards
def test_held_out_splits_are_uniform_draws_because_stratified_sets_bias_kid(digits_shards, eval_cache):
    # KID's U-statistic treats each set as independent draws. Two stratified sets of 297 digits (every class in
    # proportion) are more alike than that: over 20 pairs their KID sits at about −0.03 with a spread of 0.004, far below
    # 0; uniform draws of the same sizes average within noise of 0. Hence the validation and test splits are uniform.
    from pipelines.evaluate import Evaluator, read_split

    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=20)
    parts = [read_split(digits_shards, split) for split in ("train", "validation", "test")]
    features = evaluator.scaler()(evaluator.features(np.concatenate([p[0] for p in parts]))["features"])
    labels = np.concatenate([p[1] for p in parts])
    stratified, uniform = [], []
    for seed in range(20):
        a = stratified_indices(labels, 297, seed)
        rest = np.setdiff1d(np.arange(len(labels)), a)
        stratified.append(kid(features[a], features[rest[stratified_indices(labels[rest], 297, seed + 100)]]).value)
        a = held_out_indices(len(labels), 297, seed)
        rest = np.setdiff1d(np.arange(len(labels)), a)
        uniform.append(kid(features[a], features[rest[held_out_indices(len(rest), 297, seed + 100)]]).value)
    se = np.std(uniform, ddof=1) / math.sqrt(len(uniform))
    assert np.mean(stratified) < -0.015 and np.mean(stratified) + 3 * np.std(stratified, ddof=1) < 0
    assert abs(np.mean(uniform)) < 3 * se


def test_the_feature_classifier_is_an_instrument(digits_shards, tmp_path, eval_cache, capsys):
    from pipelines.evaluate import Evaluator

    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=20)  # the session's (trained once)
    assert evaluator.info["classifier_test_accuracy"] >= 0.96  # trained on the 1203 training digits (0.966)
    assert (evaluator.reference_features()["features"].std(0) > 0).all()  # no dead features
    twin = Evaluator(digits_shards, "classifier", cache_dir=tmp_path, resamples=20)  # trained again, from the same seed
    assert twin.extractor_id == evaluator.extractor_id  # same weights, same digest (the cache key and the metrics' record)
    images = evaluator.reference[:50]
    assert np.array_equal(twin.features(images)["features"], evaluator.features(images)["features"])
    capsys.readouterr()
    evaluator.progress = True  # as on a terminal: each bar names the images it extracts features of
    evaluator.evaluate(images, what="the first 50 test images")
    bars = capsys.readouterr().err
    assert "classifier features of the first 50 test images" in bars and "Processing samples" not in bars


def test_baselines_use_held_out_real_images_and_the_gaussian_is_separated(digits_shards, eval_cache):
    # The real-data floor and its IS come from the validation split, which neither the score network nor the classifier
    # trained on; against the validation split as reference (tuning's), the floor's real images come from the test split.
    from pipelines.evaluate import Evaluator

    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=100)
    base = evaluator.baselines(250)
    floor, gaussian = base["heldout_real"], base["gaussian"]
    assert floor.kid.low <= 0 <= floor.kid.high and gaussian.kid.low > floor.kid.high
    assert floor.num_samples == 250 and floor.num_reference == 297 and set(base) == {"heldout_real", "gaussian"}
    assert evaluator.heldout_split() == "validation"
    assert evaluator.baselines(250) == base  # cached
    on_validation = Evaluator(digits_shards, "classifier", reference_split="validation", cache_dir=eval_cache, resamples=20)
    assert on_validation.heldout_split() == "test" and on_validation.baselines(50)["heldout_real"].reference_split == "validation"


def test_sets_larger_than_the_bootstrap_rows_use_all_rows_for_the_values(digits_shards, eval_cache, monkeypatch):
    import pipelines.evaluate as evaluate

    evaluator = evaluate.Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=20)
    images = evaluator.reference[:250]
    exact = evaluator.evaluate(images)
    monkeypatch.setattr(evaluate, "BOOTSTRAP_ROWS", 100)  # as 50 000 samples against 10 000 would be
    large = evaluator.evaluate(images)
    assert large.fid.value == pytest.approx(exact.fid.value) and large.inception_score.value == pytest.approx(exact.inception_score.value)
    assert abs(large.kid.value - exact.kid.value) < exact.kid.high - exact.kid.low  # KID from 100-row blocks: same estimand
    assert large.kid.high - large.kid.low > exact.kid.high - exact.kid.low  # the width of a 100-row subset: wider
    assert large.fid.sd > exact.fid.sd


def test_evaluate_scores_any_folder_of_images(digits_shards, tmp_path, eval_cache):
    source = DigitsSource()
    folder = tmp_path / "pngs"
    (folder / "nested").mkdir(parents=True)
    for i, record in enumerate(source.read("train", 0, 40)):
        Image.fromarray(record.image[..., 0]).convert("RGB").save(folder / ("nested" if i % 2 else "") / f"{i:03d}.png")
    elsewhere = tmp_path / "elsewhere.txt"  # the report's path is a link to a file the command does not own
    elsewhere.write_text("keep")
    (tmp_path / "r.json").symlink_to(elsewhere)
    out = subprocess.run([CLI, "evaluate", "--samples", str(folder), "--reference", digits_shards, "--no-baselines",
                          "--cache-dir", str(eval_cache), "--resamples", "20", "--output", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert elsewhere.read_text() == "keep" and not (tmp_path / "r.json").is_symlink()  # replaced, not written through
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["num_samples"] == 40 and report["model"]["num_reference"] == 297
    assert "kid_std " in out.stdout and "model (40 vs 297 test)" in out.stdout
    # Sizes come from the file headers, before any image is decoded: a larger image, and a decompression bomb (a PNG
    # declaring 20000×20000 pixels in a few bytes), are each one line naming the file.
    Image.new("RGB", (16, 16)).save(folder / "big.png")
    bomb = bytearray((folder / "000.png").read_bytes())  # IHDR: width and height at bytes 16–24, its CRC at 29–33
    bomb[16:24] = (20000).to_bytes(4, "big") * 2
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    for name, message in (("big.png", "big.png: 16×16 pixels, the reference's images are 8×8; resize them first"),
                          ("bomb.png", "bomb.png: not a readable image: Image size (400000000 pixels) exceeds limit")):
        if name == "bomb.png":
            (folder / "big.png").unlink()
            (folder / "bomb.png").write_bytes(bytes(bomb))
        bad = subprocess.run([CLI, "evaluate", "--samples", str(folder), "--reference", digits_shards, "--no-baselines",
                              "--cache-dir", str(eval_cache)], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
        assert bad.stderr.startswith(f"ncsn-pipeline evaluate: error: {folder}/{message}"), bad.stderr


def test_unlabelled_shards_name_the_offline_options(tmp_path, ray_local):
    from data_prep.shard import ShardOptions, shard_dataset
    from pipelines.evaluate import EvaluationError, Evaluator

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    shard_dataset(ShardOptions("image-folder", input=str(folder), shard_size=50), str(tmp_path / "shards"), progress=False)
    with pytest.raises(EvaluationError, match="needs labelled training images .* --feature-extractor inception .*--inception-weights PATH") as err:
        Evaluator(str(tmp_path / "shards"), "classifier", cache_dir=tmp_path / "cache")
    assert str(err.value).startswith(f"{tmp_path / 'shards'}: ")  # the shard set's location, not the manifest object

"""Evaluation a tuning job can trust (issue 13): estimators equal to torch-fidelity's, intervals that cover what they
should, a deterministic feature classifier, a stratified digits split, scoring any image folder, and a confirmation
stage that re-ranks a lucky search result."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.sources import DigitsSource, stratified_test_indices
from ncsn.metrics import bootstrap, frechet_distance, inception_score, kid_in_blocks, kid_statistic, standardise
from pipelines.confirm import Candidate, candidates, rank, verdict

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
    xs, ys = standardise(x[:90], y)  # torch-fidelity's KID: equal set sizes, one subset of all rows
    fidelity_kid = kid_features_to_metric(torch.from_numpy(xs), torch.from_numpy(ys), kid_subsets=1, kid_subset_size=90, verbose=False)
    assert kid_statistic(x[:90], y)(np.arange(90), np.arange(90)) == pytest.approx(fidelity_kid["kernel_inception_distance_mean"], rel=1e-9)
    few, many = _features(rng, 20, 0.3, d=64), _features(rng, 30, d=64)  # n·m ≤ d²: the cross-product SVD form
    stats = [fid_features_to_statistics(torch.from_numpy(v)) for v in (few, many)]
    # (rank-deficient covariances: scipy's sqrtm behind torch-fidelity's value is the less precise one here)
    assert frechet_distance(few, many) == pytest.approx(fid_statistics_to_metric(*stats, False)["frechet_inception_distance"], rel=1e-7)
    logits = rng.standard_normal((200, 10)) * 3
    assert inception_score(logits) == pytest.approx(isc_features_to_metric(torch.from_numpy(logits), splits=1)["inception_score_mean"], rel=1e-9)


def test_kid_in_blocks_is_the_unbiased_statistic_of_its_blocks():
    rng = np.random.default_rng(4)
    x, y = _features(rng, 150, 0.2), _features(rng, 150)
    assert kid_in_blocks(x, y, 1000, seed=0) == pytest.approx(kid_statistic(x, y)(np.arange(150), np.arange(150)), rel=1e-9)
    same = [kid_in_blocks(_features(rng, 600), _features(rng, 400), 100, seed=i) for i in range(20)]  # one distribution
    assert abs(np.mean(same)) < 2 * np.std(same) / np.sqrt(len(same))  # no bias: the mean is within its standard error of 0


def test_kid_intervals_cover_zero_for_one_distribution_at_the_stated_rate():
    # 40 independent pairs of sets from one distribution: a 95% interval that is too narrow misses 0 far more often than
    # 6 times in 40 (at this null the bootstrap is conservative: it covers more often than 95%).
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(40):
        x, y = _features(rng, 80), _features(rng, 100)
        kid = bootstrap(kid_statistic(x, y), 80, 100, 100, seed=i)
        covered += kid.low <= 0 <= kid.high
    assert covered >= 34


def test_kid_interval_width_matches_the_estimators_spread_between_distributions():
    # Where the sets differ, the bootstrap's standard deviation is the estimator's: over 40 independent pairs, the mean
    # half-width / 1.96 is within 15% below to 30% above the spread of the values (resampling one set only gives 0.81).
    rng = np.random.default_rng(3)
    values, widths = [], []
    for i in range(40):
        x, y = rng.standard_normal((100, 16)) * 1.3 + 0.3, rng.standard_normal((120, 16))
        kid = bootstrap(kid_statistic(x, y), 100, 120, 60, seed=i)
        values.append(kid.value)
        widths.append((kid.high - kid.value) / 1.96)
    assert 0.85 < np.mean(widths) / np.std(values) < 1.3


def test_a_shifted_distribution_is_separated_by_more_than_its_interval():
    rng = np.random.default_rng(2)
    x, y, z = _features(rng, 150, 0.25), _features(rng, 150), _features(rng, 150)
    shifted, same = bootstrap(kid_statistic(x, y), 150, 150, 100, 0), bootstrap(kid_statistic(z, y), 150, 150, 100, 0)
    assert shifted.low > same.high and shifted.low > 0
    fid = bootstrap(lambda ix, iy: frechet_distance(x[ix], y[iy]), 150, 150, 100, 0)
    assert fid.low < fid.value < fid.high


def test_the_digits_test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # load_digits' class sizes
    test = stratified_test_indices(labels, 297, seed=0)
    assert len(test) == len(set(test)) == 297
    expected = 297 * np.bincount(labels) / len(labels)
    assert np.all(np.abs(np.bincount(labels[test], minlength=10) - expected) < 1)  # every class in proportion
    assert np.array_equal(test, stratified_test_indices(labels, 297, seed=0))
    assert not np.array_equal(test, stratified_test_indices(labels, 297, seed=1))
    source = DigitsSource()
    keys = {split: {r.key for r in source.read(split, 0, source.count(split))} for split in ("train", "test")}
    assert len(keys["train"]) == 1500 and len(keys["test"]) == 297 and not keys["train"] & keys["test"]
    assert "stratified" in source.split_rule and "seed 0" in source.split_rule


def _candidate(trial: str, label: str, objective: float) -> Candidate:
    return Candidate(trial, label, objective, f"/ckpt/{trial}", 0, 1e-5, 5)


def test_confirmation_re_ranks_a_lucky_search_result():
    # The search saw "lucky" at 0.10 (one noisy evaluation); on fresh seeds it is worse than "steady" and `recommended`.
    found = [_candidate("lucky", "search", 0.10), _candidate("steady", "search", 0.30), _candidate("rec", "recommended", 0.35)]
    scores = {"lucky": [0.50, 0.55, 0.45], "steady": [0.20, 0.22, 0.19], "rec": [0.40, 0.43, 0.39]}
    confirmed = rank(found, scores)
    assert [c.candidate.trial_id for c in confirmed] == ["steady", "rec", "lucky"]
    best = confirmed[0]
    assert best.mean.value == pytest.approx(np.mean(scores["steady"])) and best.mean.low < best.mean.value < best.mean.high
    assert best.vs_recommended.high < 0  # paired per seed: steady beats rec on every seed
    assert "beat the recommended schedule by 0.2033" in verdict(confirmed, "kid_classifier")
    close = rank(found, {**scores, "steady": [0.35, 0.47, 0.37]})
    assert "not distinguishable" in verdict(close, "kid_classifier")
    only_rec = rank(found, {**scores, "steady": [0.6, 0.6, 0.6]})
    assert "no searched schedule beat" in verdict(only_rec, "kid_classifier")


def test_confirmation_candidates_are_the_top_trials_with_a_checkpoint_and_recommended():
    rows = [{"trial_id": t, "label": label, "objective": obj, "eps": 1e-5, "steps_per_level": 5}
            for t, label, obj in (("a", "search", 0.1), ("b", "search", 0.2), ("c", "search", 0.3), ("r", "recommended", 0.9),
                                  ("stopped", "search", 0.05), ("failed", "search", None))]
    found = candidates(rows, 2, lambda r: None if r["trial_id"] == "stopped" else f"/ckpt/{r['trial_id']}")
    assert [c.trial_id for c in found] == ["a", "b", "r"]


# ---------------------------------------------------------------- on the digits shards
def test_the_feature_classifier_is_an_instrument(digits_shards, tmp_path, eval_cache):
    from pipelines.evaluate import Evaluator

    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=20)  # the session's (trained once)
    assert evaluator.info["classifier_test_accuracy"] >= 0.97
    assert (evaluator.reference_features()["features"].std(0) > 0).all()  # no dead features
    twin = Evaluator(digits_shards, "classifier", cache_dir=tmp_path, resamples=20)  # trained again, from the same seed
    assert twin.extractor_id == evaluator.extractor_id  # same weights, same digest (the cache key and the metrics' record)
    images = evaluator.reference[:50]
    assert np.array_equal(twin.features(images)["features"], evaluator.features(images)["features"])


def test_baselines_same_split_floor_covers_zero_and_the_gaussian_is_separated(digits_shards, eval_cache):
    from pipelines.evaluate import Evaluator

    evaluator = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=100)
    base = evaluator.baselines(250)
    floor, gaussian = base["same_split_floor"], base["gaussian"]
    assert floor.kid.low <= 0 <= floor.kid.high
    assert gaussian.kid.low > floor.kid.high
    assert floor.num_samples == 250 and floor.num_reference == 297 and base["train_vs_test"].num_reference == 297
    assert evaluator.baselines(250) == base  # cached


def test_sets_larger_than_the_bootstrap_rows_use_all_rows_for_the_values(digits_shards, eval_cache, monkeypatch):
    import pipelines.evaluate as evaluate

    evaluator = evaluate.Evaluator(digits_shards, "classifier", cache_dir=eval_cache, resamples=20)
    images = evaluator.reference[:250]
    exact = evaluator.evaluate(images)
    monkeypatch.setattr(evaluate, "BOOTSTRAP_ROWS", 100)  # as 50 000 samples against 10 000 would be
    large = evaluator.evaluate(images)
    assert large.fid.value == pytest.approx(exact.fid.value) and large.inception_score.value == pytest.approx(exact.inception_score.value)
    assert abs(large.kid.value - exact.kid.value) < exact.kid.high - exact.kid.low  # KID from 100-row blocks: same estimand
    assert large.fid.high - large.fid.low > exact.fid.high - exact.fid.low  # the widths of a 100-row subset: wider


def test_evaluate_scores_any_folder_of_images(digits_shards, tmp_path, eval_cache):
    source = DigitsSource()
    folder = tmp_path / "pngs"
    (folder / "nested").mkdir(parents=True)
    for i, record in enumerate(source.read("train", 0, 40)):
        Image.fromarray(record.image[..., 0]).convert("RGB").save(folder / ("nested" if i % 2 else "") / f"{i:03d}.png")
    out = subprocess.run([CLI, "evaluate", "--samples", str(folder), "--reference", digits_shards, "--no-baselines",
                          "--cache-dir", str(eval_cache), "--resamples", "20", "--output", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["num_samples"] == 40 and report["model"]["num_reference"] == 297
    assert "kid " in out.stdout and "model (40 vs 297)" in out.stdout
    Image.new("RGB", (16, 16)).save(folder / "big.png")
    bad = subprocess.run([CLI, "evaluate", "--samples", str(folder), "--reference", digits_shards, "--no-baselines",
                          "--cache-dir", str(eval_cache)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith(f"ncsn-pipeline evaluate: error: {folder}: images of 2 different sizes")


def test_unlabelled_shards_name_the_offline_options(tmp_path, ray_local):
    from data_prep.shard import ShardOptions, shard_dataset
    from pipelines.evaluate import EvaluationError, Evaluator

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    shard_dataset(ShardOptions("image-folder", input=str(folder), shard_size=50), str(tmp_path / "shards"), progress=False)
    with pytest.raises(EvaluationError, match="needs labelled training images .* --feature-extractor inception .*--inception-weights PATH"):
        Evaluator(str(tmp_path / "shards"), "classifier", cache_dir=tmp_path / "cache")

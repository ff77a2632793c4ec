"""Numbers that can stand beside a paper's: the published convention equals torch-fidelity's own calculate_metrics on
the same image folders, reference statistics files (pytorch-fid / TTUR / EDM's mu and sigma) are read without unpickling
and checked against the extractor, FID from saved statistics equals FID from the images, and every report carries a
card that says what its numbers depend on."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.evaluate import (Convention, EvaluationError, Evaluator, check_reference_stats, compare_cards, load_image_folder,
                                load_reference_stats)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write_pngs(images: np.ndarray, folder: Path) -> Path:
    """uint8 (N, H, W, 1) images as folder/00000.png … in their order (the order torch-fidelity sorts them into)."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def published(digits_shards, eval_cache):
    """A published-convention evaluator on the digits' test split (KID subsets of 250 rows: the split has 297)."""
    return Evaluator(digits_shards, "classifier", cache_dir=eval_cache, convention=Convention("published", kid_subset_size=250))


def test_published_convention_equals_torch_fidelitys_calculate_metrics_on_the_same_folders(published, tmp_path):
    # The project's classifier, registered as a torch-fidelity feature extractor, run by torch-fidelity itself on two image
    # folders: the samples (a blurred copy of the validation images, so FID and KID are far from 0) and the reference
    # (the test split in shard order). FID and KID agree to 1e-4 relative, IS to rounding (the same split order).
    import torch_fidelity

    rng = np.random.default_rng(0)
    real = published.split_images("validation")
    samples = np.clip(real.astype(np.int16) + rng.integers(-40, 41, real.shape), 0, 255).astype(np.uint8)
    ours_dir, ref_dir = _write_pngs(samples, tmp_path / "samples"), _write_pngs(published.reference, tmp_path / "reference")
    loaded = load_image_folder(ours_dir, 1, 8)
    assert np.array_equal(loaded, samples)  # what the CLI reads from the folder is what torch-fidelity reads
    ours = published.evaluate(loaded)
    theirs = torch_fidelity.calculate_metrics(input1=str(ours_dir), input2=str(ref_dir), cuda=False, isc=True, fid=True, kid=True,
                                              feature_extractor="ncsn-classifier", feature_extractor_weights_path=published.weights,
                                              kid_subset_size=250, cache=False, verbose=False)
    assert ours.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours.kid.value == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours.kid.sd == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    assert ours.inception_score.value == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours.inception_score.sd == pytest.approx(theirs["inception_score_std"], rel=1e-7)
    assert ours.fid > 5 and ours.kid.value > 2 * ours.kid.sd  # a real difference, not two zeros agreeing
    card = ours.card()
    assert (card["convention"], card["is_splits"], card["kid_features"], card["num_samples"], card["num_reference"]) == \
        ("published", 10, "raw (as extracted)", 297, 297)
    assert card["kid_subsets"] == "100 subsets of 250 rows (seed 2020)" and card["extractor_id"] == published.extractor_id
    assert set(ours.flat()) == {"kid_classifier", "kid_classifier_sd", "fid_classifier", "is_classifier", "is_classifier_sd",
                                "num_samples", "num_reference"}


def test_fid_from_saved_statistics_equals_fid_from_the_images_and_the_file_is_checked(published, digits_shards, eval_cache, tmp_path):
    stats_file = tmp_path / "digits_test.npz"
    published.save_stats(stats_file)
    with np.load(stats_file, allow_pickle=False) as npz:  # what pytorch-fid / EDM read: mu (d,), sigma (d, d), float64
        assert npz["mu"].shape == (128,) and npz["sigma"].shape == (128, 128) and npz["sigma"].dtype == np.float64
        assert str(npz["extractor_id"]) == published.extractor_id and int(npz["num_images"]) == 297
    stats = load_reference_stats(str(stats_file))
    from_file = Evaluator(digits_shards, "classifier", cache_dir=eval_cache, convention=published.convention, reference_stats=stats)
    samples = published.split_images("validation")
    by_images, by_stats = published.evaluate(samples), from_file.evaluate(samples)
    assert by_stats.fid == pytest.approx(by_images.fid, rel=1e-9) and by_stats.inception_score == by_images.inception_score
    assert by_stats.kid is None and by_stats.kid_note == "a statistics file holds no features"
    assert by_stats.card()["reference"] == f"statistics file {stats_file} (sha256 {stats.sha256})" and by_stats.num_reference == 297
    assert compare_cards({"images": by_images.card(), "stats": by_stats.card()}) == [
        f"reference: {by_images.reference} (images) vs {by_stats.reference} (stats)", "reference_split: test (images) vs stats (stats)"]
    with pytest.raises(EvaluationError, match="--reference-stats needs the published convention"):
        Evaluator(digits_shards, "classifier", cache_dir=eval_cache, reference_stats=stats)
    with pytest.raises(EvaluationError, match=f"made with classifier weights {published.extractor_id}, this evaluation's are 0+"):
        check_reference_stats(stats, "classifier", "0" * 16)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_statistics_files_in_the_published_formats_load_and_anything_else_is_refused_with_one_line(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 2048)).astype(np.float32)
    sigma = np.cov(a, rowvar=False)
    # TTUR / pytorch-fid: np.mean of float32 activations (float32) and np.cov (float64); EDM: both float64
    ttur = load_reference_stats(_npz(tmp_path / "ttur.npz", mu=a.mean(0), sigma=sigma))
    edm = load_reference_stats(_npz(tmp_path / "edm.npz", mu=a.mean(0).astype(np.float64), sigma=sigma))
    assert ttur.mu.dtype == edm.mu.dtype == np.float64 and ttur.extractor is None and len(ttur.sha256) == 64
    check_reference_stats(ttur, "inception")  # Inception statistics with no record of the weights: accepted
    anonymous = load_reference_stats(_npz(tmp_path / "anonymous.npz", mu=np.zeros(128), sigma=np.eye(128)))
    with pytest.raises(EvaluationError, match="says nothing of the classifier that made it"):
        check_reference_stats(anonymous, "classifier")
    eye, mu = np.eye(4), np.zeros(4)
    bad = {
        "pickled.npz": (dict(mu=np.array([object()], dtype=object), sigma=eye), "not a NumPy .npz of plain arrays"),
        "extra.npz": (dict(mu=mu, sigma=eye, labels=mu), r"expected the arrays mu and sigma \(FID statistics\), found \['labels', 'mu', 'sigma'\]"),
        "missing.npz": (dict(mu=mu), r"expected the arrays mu and sigma \(FID statistics\), found \['mu'\]"),
        "shape.npz": (dict(mu=mu, sigma=np.eye(3)), r"mu must be \(d,\) and sigma \(d, d\) floats, got \(4,\) float64 and \(3, 3\)"),
        "ints.npz": (dict(mu=np.zeros(4, int), sigma=np.eye(4, dtype=int)), r"mu must be \(d,\) and sigma \(d, d\) floats, got \(4,\) int64"),
        "nan.npz": (dict(mu=mu + np.nan, sigma=eye), "mu or sigma holds NaN or infinite values"),
        "skew.npz": (dict(mu=mu, sigma=eye + np.triu(np.ones((4, 4)), 1)), "sigma is not symmetric, so it is not a covariance"),
    }
    for name, (arrays, message) in bad.items():
        with pytest.raises(EvaluationError, match=f"^--reference-stats {tmp_path / name}: {message}"):
            load_reference_stats(_npz(tmp_path / name, **arrays))
    (tmp_path / "text.npz").write_text("mu,sigma\n")
    for path, message in ((tmp_path / "text.npz", "not a NumPy .npz of plain arrays"), (tmp_path / "absent.npz", "no such file")):
        with pytest.raises(EvaluationError, match=message):
            load_reference_stats(str(path))
    with pytest.raises(EvaluationError, match="2048-d statistics, but the classifier extractor's features are 128-d"):
        check_reference_stats(ttur, "classifier")


def test_the_published_convention_is_refused_before_any_work_when_its_counts_do_not_fit(digits_shards, eval_cache, tmp_path, capsys):
    with pytest.raises(EvaluationError, match="the reference has 297 images, fewer than KID's subset size 1000"):
        Evaluator(digits_shards, "classifier", cache_dir=tmp_path / "never", convention=Convention("published"))
    assert not (tmp_path / "never").exists()  # refused before the classifier trained
    with pytest.raises(EvaluationError, match="convention must be project or published, got 'paper'"):
        Convention("paper")
    with pytest.raises(ConfigError, match=r"evaluation.kid_subset_size must be <= sampling.num_samples \(500\) with the published"):
        load_config(CONFIGS / "digits.yaml", ["evaluation.convention=published"])
    with pytest.raises(ConfigError, match="evaluation.reference_stats must be null unless evaluation.convention is published"):
        load_config(CONFIGS / "digits.yaml", ["evaluation.reference_stats=cifar10.npz"])
    from pipelines.run import run_pipeline
    cfg = load_config(CONFIGS / "digits.yaml", ["evaluation.convention=published", "evaluation.kid_subset_size=400",
                                                 f"run_dir={tmp_path / 'run'}", f"evaluation.cache_dir={eval_cache}"])
    with pytest.raises(EvaluationError, match="the reference has 297 images, fewer than KID's subset size 400"):
        run_pipeline(cfg, digits_shards)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing tracked
    from pipelines.cli import main
    dry = ["run", "--config", str(CONFIGS / "digits.yaml"), "--dry-run", "--shards", digits_shards, "--set", f"run_dir={tmp_path / 'run'}",
           "--set", "evaluation.convention=published", "--set", "evaluation.kid_subset_size=250"]
    assert main(dry) == 0
    assert "evaluate 500 samples in the published convention with classifier features against the test split" in capsys.readouterr().out
    assert main(dry[:-1] + ["evaluation.kid_subset_size=400"]) == 1
    assert capsys.readouterr().err.strip() == ("ncsn-pipeline run: error: the reference has 297 images, fewer than KID's subset size 400 "
                                               "(--kid-subset-size / evaluation.kid_subset_size)")
    cifar = load_config(CONFIGS / "cifar10.yaml")
    assert (cifar.evaluation.convention, cifar.evaluation.reference_split, cifar.sampling.num_samples) == ("published", "train+validation", 50000)


def test_evaluate_cli_writes_the_card_and_compare_flags_reports_whose_cards_differ(published, digits_shards, eval_cache, tmp_path,
                                                                                   capsys):
    from pipelines.cli import main  # in this process: the same code path as the console script, without its start-up

    folder = _write_pngs(published.split_images("validation"), tmp_path / "pngs")
    common = ["evaluate", "--samples", str(folder), "--reference", digits_shards, "--cache-dir", str(eval_cache), "--no-baselines",
              "--no-progress"]
    runs = {"project": common + ["--resamples", "10", "--output", str(tmp_path / "project.json")],
            "published": common + ["--convention", "published", "--kid-subset-size", "250", "--output", str(tmp_path / "published.json")]}
    for name, argv in runs.items():
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"  card: {name} convention; classifier features (weights {published.extractor_id}); 297 samples vs the test split" in out
    record = json.loads((tmp_path / "published.json").read_text())
    assert record["card"]["convention"] == "published" and record["model"]["kid_subsets"] == "100 subsets of 250 rows (seed 2020)"
    assert main(["evaluate", "--compare", str(tmp_path / "published.json"), str(tmp_path / "published.json")]) == 0
    same = capsys.readouterr().out
    assert "comparable: the cards agree" in same and "NOT COMPARABLE" not in same
    assert main(["evaluate", "--compare", str(tmp_path / "project.json"), str(tmp_path / "published.json")]) == 0
    differ = capsys.readouterr().out
    assert "NOT COMPARABLE: the cards differ in" in differ
    assert f"  convention: project ({tmp_path / 'project.json'}) vs published ({tmp_path / 'published.json'})" in differ
    assert "kid_std_classifier_low" in differ and "is_classifier_sd" in differ
    png = tmp_path / "pngs" / "00000.png"
    assert main(["evaluate", "--compare", str(png), str(tmp_path / "project.json")]) == 1
    assert capsys.readouterr().err.startswith(f"ncsn-pipeline evaluate: error: --compare {png}: not a report written by "
                                              "`ncsn-pipeline evaluate`")

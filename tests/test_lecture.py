"""`ncsn-pipeline reproduce --quick`: every result of the lecture, each checked on the property its figure shows (not its
pixels). The math experiments need no Ray and no trained model (the fast tier); the digits figures use the session's
trained digits model (the cluster tier), drawn into a folder whose results.json already holds the others."""
import json

import pytest

from pipelines.reproduce import EXPERIMENTS, FIGURES, reproduce

MATH = tuple(e for e in EXPERIMENTS if e != "digits")
DIGITS_FIGURES = ("annealed-trajectory", "inpainting", "samples")


@pytest.fixture(scope="module")
def lecture(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("lecture")
    results = reproduce(out, quick=True, only=MATH)
    return results, json.loads((out / "results.json").read_text()) | {"out": out}


def test_every_math_figure_is_drawn_and_recorded(lecture):
    results, record = lecture
    assert list(results) == [f for f in FIGURES if f not in DIGITS_FIGURES] and record["quick"] is True
    assert set(record["figures"]) == set(results)
    for figure, numbers in results.items():
        assert numbers["png"] == f"{figure}.png" and (record["out"] / numbers["png"]).stat().st_size > 2_000, figure


def test_the_digits_figures_join_the_others_in_results_json(tmp_path, trained_digits):
    # a folder holding some figures' numbers: running only the digits experiment adds its figures and keeps the rest
    reproduce(tmp_path, quick=True, only=("gaussian-sm-mle",))
    results = reproduce(tmp_path, quick=True, checkpoint=str(trained_digits[2]), only=("digits",))
    assert list(results) == [f for f in FIGURES if f in DIGITS_FIGURES]
    record = json.loads((tmp_path / "results.json").read_text())
    assert list(record["figures"]) == ["gaussian-sm-mle", *DIGITS_FIGURES]
    for figure in record["figures"]:
        assert (tmp_path / f"{figure}.png").stat().st_size > 2_000, figure
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) ica; choose from gaussian-sm-mle, "):
        reproduce(tmp_path, quick=True, only=("ica",))


def test_score_matching_equals_maximum_likelihood_for_the_gaussian(lecture):
    numbers = lecture[0]["gaussian-sm-mle"]
    assert numbers["max_abs_difference_mu"] < 1e-10 and numbers["max_abs_difference_precision"] < 1e-9


def test_ica_errors_fall_as_one_over_root_n_and_stop_at_a_floor_when_the_density_is_misspecified(lecture):
    correct, wrong = lecture[0]["ica-error"], lecture[0]["ica-misspecified"]
    assert all(abs(slope + 0.5) < 0.15 for slope in correct["slopes"].values()), correct["slopes"]
    # √n-consistent: 10^-¼ ≈ 0.56 from one size to the next; under misspecification the bias floor holds the error up
    assert all(ratio < 0.7 for ratio in correct["last_ratios"].values()), correct["last_ratios"]
    assert all(ratio > 0.7 for ratio in wrong["last_ratios"].values()) and wrong["last_ratios"]["score_matching"] > 0.85, wrong
    assert wrong["score_matching"][-1] > 3 * correct["score_matching"][-1]


def test_overcomplete_filters_are_not_copies_of_each_other(lecture):
    filters, dots = lecture[0]["overcomplete-filters"], lecture[0]["overcomplete-dot-products"]
    assert filters["m"] == 2 * filters["p"] == 126 and filters["patch_size"] == 8
    assert filters["objective_end"] < 1.5 * filters["objective_start"] < 0  # fitted, not left at their random start
    assert dots["median_max_dot"] < 0.9 and dots["fraction_above_0.95"] <= 0.1


def test_sliced_score_matching_settles_only_with_noise_on_a_manifold(lecture):
    assert lecture[0]["manifold-ssm"]["ratio"] >= 3


def test_learned_scores_are_wrong_where_there_is_no_data(lecture):
    assert lecture[0]["low-density-scores"]["ratio"] >= 3


def test_annealed_langevin_recovers_the_mode_weights_and_plain_langevin_does_not(lecture):
    weights = lecture[0]["mixture-langevin"]
    assert abs(weights["annealed"] - weights["true"]) < 0.04 and abs(weights["langevin"] - weights["true"]) > 0.08


def test_the_figures_and_their_numbers_go_to_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.reproduce import log_to_mlflow

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ica-error.png").write_bytes(b"\x89PNG")
    (tmp_path / "out" / "results.json").write_text("{}")
    results = {"ica-error": {"png": "ica-error.png", "slopes": {"score_matching": -0.5}, "n": 1000, "ratio": 0.56, "label": "x"}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(log_to_mlflow(uri, tmp_path / "out", results))
    assert run.info.run_name == "lecture-figures" and run.info.status == "FINISHED"
    assert run.data.metrics == {"ica-error/n": 1000.0, "ica-error/ratio": 0.56}  # the scalars; lists, maps and text stay in the JSON
    assert {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "figures")} == {"figures/ica-error.png", "figures/results.json"}

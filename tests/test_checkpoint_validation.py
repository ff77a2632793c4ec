"""Checkpoint validation's contract with Ray Train: the best checkpoint is the one of lowest finite validation KID (an
unscored one, NaN, never wins), and a validation task that fails is one line and an MLflow tag, never an exception that
would reach the training run."""
import logging
import math

import ray.train
import torch
from mlflow.tracking import MlflowClient

from ncsn.checkpoint import Checkpoint, save_checkpoint
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import Schedule, geometric_sigmas
from pipelines.checkpoint_validation import CheckpointValidation, best_checkpoint, score_attribute
from pipelines.tune.objective import ObjectiveSpec


def test_the_best_checkpoint_has_the_lowest_finite_validation_kid():
    key = score_attribute("classifier")
    kept = [("a", {key: 0.3}), ("b", {key: math.nan}), ("c", {key: 0.1}), ("d", {"step": 9})]
    assert key == "val_kid_std_classifier" and best_checkpoint(kept, key) == ("c", {key: 0.1})
    assert best_checkpoint([("b", {key: math.nan}), ("d", {})], key) is None  # nothing scored: the caller keeps the last


def test_a_failing_validation_is_one_line_and_a_tag_and_returns_nothing(tmp_path, caplog):
    sigmas = geometric_sigmas(1.0, 0.01, 3)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), sigmas)
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", Checkpoint(model.config, Schedule(sigmas, 1e-4, 1), model.state_dict(), step=40))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("v")).info.run_id
    planted = ObjectiveSpec(str(tmp_path / "no-shards"), "validation", "classifier", str(tmp_path / "cache"), 10, 10, True, 10)
    validate = CheckpointValidation(planted, 0, uri, run_id, ("digits", "0" * 16))
    with caplog.at_level(logging.WARNING, logger="pipelines.checkpoint_validation"):
        assert validate(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt"))) == {}
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pipelines.checkpoint_validation"]
    assert line.startswith("checkpoint validation of step 40 failed: ") and str(tmp_path / "no-shards") in line and "\n" not in line
    assert client.get_run(run_id).data.tags["validation.failed.step_40"] == line
    assert client.search_logged_models([client.get_run(run_id).info.experiment_id]) == []  # nothing scored, nothing logged
    assert torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["step"] == 40  # the checkpoint is left as it was

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


def test_without_scoring_the_task_draws_the_grid_rank_0_would_have_drawn(tmp_path):
    # evaluation.checkpoint_samples 0: the validation task only logs the checkpoint's sample grid, at its step, the same
    # images (training seed, the checkpoint's EMA network and sampler) rank 0 drew inline, and reports nothing to rank by.
    import numpy as np
    from PIL import Image

    from ncsn.images import save_image_grid
    from pipelines.train_worker import grid_samples
    from tests.servers import logged_image_steps

    sigmas = geometric_sigmas(1.0, 0.01, 3)
    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), sigmas)
    raw = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}  # the EMA weights, not these, draw the grid
    (tmp_path / "ckpt").mkdir()
    schedule = Schedule(sigmas, 1e-4, 2)
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", Checkpoint(model.config, schedule, raw, model.state_dict(), step=30))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("g")).info.run_id
    grid_only = CheckpointValidation(None, 7, uri, run_id, ("digits", "0" * 16))
    assert grid_only(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt"))) == {}
    assert logged_image_steps(client, run_id, "samples") == [30]
    (logged,) = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    got = np.asarray(Image.open(client.download_artifacts(run_id, logged, str(tmp_path))))
    inline = save_image_grid(grid_samples(model.eval().requires_grad_(False), schedule, 7, torch.device("cpu")), tmp_path / "inline.png", nrow=10)
    assert np.array_equal(got, np.asarray(Image.open(inline)))
    assert client.search_logged_models([client.get_run(run_id).info.experiment_id]) == []  # nothing scored, no checkpoint model

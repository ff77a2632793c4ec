"""The end-to-end pipeline (`ncsn-pipeline run`) with a small digits config, submitted as a Ray job to a Ray head the
tests start on 127.0.0.1 (token authentication on) and kill (tests.runs). The same run on two hosts is
tests/test_two_hosts.py. A CLI that starts its own local Ray (as `make demo` does) is tested with `ncsn-pipeline tune`
and `shard`."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ncsn.checkpoint import load_checkpoint
from pipelines.sample import read_checkpoint
from tests.servers import only_ray_instance

pytestmark = pytest.mark.cluster  # whole pipelines on Ray, from the CLI and as Ray jobs

PROGRESS = re.compile(r"step 20/20 +loss [\d.]+ +\d+ img/s +ETA 0m00s")


def _check_outputs(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"fid_classifier", "fid_classifier_sd", "is_1split_classifier", "kid_std_classifier", "kid_std_classifier_low",
            "kid_std_classifier_high", "num_samples", "heldout_real_kid_std_classifier", "gaussian_fid_classifier",
            "classifier_test_accuracy", "extractor_dead_features", "final_loss"} <= set(summary)
    record = summary["evaluation"]["model"]  # each evaluation records its extractor's digest, reference split and counts
    assert record["num_samples"] == 60 and len(record["extractor_id"]) == 16 and record["reference_split"] == "test"
    assert set(record["kid"]) == {"value", "low", "high"} and set(record["fid"]) == {"value", "sd"}
    assert "standardised" in summary["evaluation"]["card"]["kid_features"]
    assert len(list((run_dir / "samples" / "images").glob("*.png"))) == 60
    assert (run_dir / "samples" / "grid.png").exists() and (run_dir / "inpainting" / "inpainting_centre.png").exists()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ncsn").experiment_id
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'digits-pipeline'")
    (child,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.metrics["fid_classifier"] == summary["fid_classifier"] == child.data.metrics["fid_classifier"]
    assert parent.data.params["evaluation.classifier_id"] == child.data.params["evaluation.classifier_id"] == record["extractor_id"]
    card = summary["evaluation"]["card"]  # the card on both runs, as tags (a re-evaluation may change it)
    assert parent.data.tags["card.convention"] == child.data.tags["card.convention"] == card["convention"] == "project"
    assert parent.data.tags["card.reference"] == card["reference"] and card["num_samples"] == 60
    assert any(k.startswith("loss_per_sigma/000_") for k in child.data.metrics)
    # each checkpoint (steps 10 and 20) scored on the validation split by its own Ray task, a LoggedModel of the training
    # run with its KID linked; the lower KID's checkpoint is model/checkpoint.pt and registered as digits-small@best
    models = [m for m in client.search_logged_models([experiment], filter_string=f"source_run_id = '{child.info.run_id}'")
              if m.name == "checkpoint"]
    scored = {int(m.params["step"]): m for m in models}
    assert sorted(scored) == [10, 20], [m.params for m in models]
    kid = {step: next(x.value for x in m.metrics if x.key == "val_kid_std_classifier") for step, m in scored.items()}
    linked = [(x, m, step) for step, m in scored.items() for x in m.metrics if x.key.startswith("val_")]
    assert len(linked) == 12 and all(x.model_id == m.model_id and x.step == step and x.dataset_digest for x, m, step in linked)
    best = min(kid, key=kid.get)
    chosen, last = (load_checkpoint(run_dir / "model" / name) for name in ("checkpoint.pt", "last.pt"))
    assert (chosen.step, last.step) == (best, 20)
    assert summary["checkpoint"].startswith(f"model: the checkpoint of step {best}, lowest val_kid_std_classifier on the validation "
                                            f"split ({kid[best]:.4g} [")
    assert "judged below on the test split, which the choice never saw" in summary["checkpoint"]
    assert client.get_model_version_by_alias("digits-small", "best").source == f"models:/{scored[best].model_id}"
    grids = {a.path.split("+")[2] for a in client.list_artifacts(child.info.run_id, "images") if a.path.startswith("images/samples+step+")}
    assert grids == {"10", "20"}  # the sample grid of each checkpoint, drawn by its validation task
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{run_dir / 'mlflow.db'}"
    try:
        registered, _ = read_checkpoint("models:/digits-small@best")
        logged, _ = read_checkpoint(f"models:/{scored[best].model_id}")  # the LoggedModel's own URI
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    weights, reference = registered.build_model().state_dict(), chosen.build_model().state_dict()  # the EMA network both sample with
    assert registered.step == logged.step == best and all(torch.equal(weights[k].cpu(), v) for k, v in reference.items())
    assert {"summary", "samples", "inpainting", "trajectory"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.fixture(scope="module", autouse=True)
def own_ray_only():
    """Every run here starts its own Ray (a job's head, two nodes): the tests' in-process Ray is shut down for the whole
    module, not around each test (each restart costs about 5 s)."""
    with only_ray_instance():
        yield


def test_pipeline_submitted_as_a_ray_job_to_a_local_head(pipeline_job):
    assert f"Job '{pipeline_job['job']}' succeeded" in pipeline_job["status"], pipeline_job["status"]  # as the Jobs API records it


def test_run_pipeline_end_to_end_with_a_small_config(pipeline_job):
    log = pipeline_job["log"]
    assert "sample grid:" in log and "mlflow ui --backend-store-uri sqlite:///" in log, log[-3000:]
    # the address that opens the experiment's runs in the UI's model-training view (MLflow 3 otherwise opens its GenAI view)
    assert re.search(r", then open http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning$", log, re.M), log[-1000:]
    assert PROGRESS.search(log), log[-3000:]  # rank 0's progress line reaches the driver's console, and the job's log
    assert "Reporting training result" not in log  # Ray Train's per-report dumps are off without -v
    # what to run next: samples of the chosen checkpoint from its file, or from the registry with the tracking URI to set
    run_dir = pipeline_job["run_dir"]
    sample = f"ncsn-pipeline sample --num-samples 100 --seed 1 --output {run_dir / 'samples-seed1'} --checkpoint"
    assert (f"next: {sample} {run_dir / 'model' / 'checkpoint.pt'}\n  or from MLflow: MLFLOW_TRACKING_URI=sqlite:///"
            f"{run_dir / 'mlflow.db'} {sample} models:/digits-small@best\n") in log, log[-1500:]
    # no restartable actor is created with constructor arguments in the object store (Ray's error line, ray#53727): the
    # sampling actors get the weights with each call, and Ray Train's preemption watcher is off
    assert "max_restarts" not in log
    _check_outputs(pipeline_job["run_dir"])

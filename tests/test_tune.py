"""σ-schedule tuning with Ray Tune on digits, tiny budget: ASHA, nested MLflow runs, best YAML, driver restart (issue 7)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.train import run_training
from pipelines.tune import run_tuning
from tests.servers import only_ray_instance

ROOT = Path(__file__).resolve().parents[1]
# 6 trials of 30 steps, the objective every 10 (ASHA rungs 1, 2, 3), 100 samples per evaluation; ASHA keeps the top third.
TINY = ["train.steps=30", "train.batch_size=32", "data.loader_workers=0", "tracking.system_metrics=false", "tune.trials=6",
        "tune.eval_every=10", "tune.eval_samples=100", "tune.steps_per_level=[2,3]", "sampling.steps_per_level=2",
        "tune.reduction_factor=3"]


def _tune(run_dir: Path, shards: str, env: dict | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    import os

    cmd = [str(Path(sys.executable).parent / "ncsn-pipeline"), "tune", "--config", str(ROOT / "configs" / "digits.yaml"),
           "--shards", shards, "--set", f"run_dir={run_dir}", *[a for s in TINY for a in ("--set", s)], *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}, cwd=ROOT)


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "tune" / "tune_results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, digits_shards):
    """A 6-trial job whose driver is killed after its first completed trial, then restarted with the same command."""
    run_dir = tmp_path_factory.mktemp("tune") / "run"
    marker = run_dir.parent / "driver-died"
    with only_ray_instance():
        first = _tune(run_dir, digits_shards, env={"NCSN_INJECT_TUNE_DRIVER_EXIT": f"1:{marker}"})
        assert marker.exists() and first.returncode != 0, first.stderr[-3000:]
        second = _tune(run_dir, digits_shards)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, first, second


def test_restarted_driver_resumes_the_job_instead_of_starting_over(tuned):
    run_dir, _, second = tuned
    assert "resuming the tuning job" in second.stderr
    rows = _rows(run_dir)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6  # 6 trials in all, not 6 more
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("ncsn").experiment_id], "attributes.run_name = 'digits-tune'")
    assert len(parent) == 1  # one parent run across the restart


def test_asha_stops_a_trial_and_the_recommended_schedule_is_a_labelled_trial(tuned):
    run_dir, _, second = tuned
    rows = _rows(run_dir)
    assert [r["label"] for r in rows].count("recommended") == 1
    assert any(r["stopped_early"] == "True" for r in rows), rows
    assert "stopped early by ASHA" in second.stdout and "recommended schedule:" in second.stdout


def test_parent_and_child_mlflow_runs_are_nested_with_params_curves_and_results(tuned):
    run_dir, _, _ = tuned
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ncsn").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'digits-tune'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len({c.data.params["tune.trial_id"] for c in children}) == len(children) == 6
    stopped = {r["trial_id"] for r in _rows(run_dir) if r["stopped_early"] == "True"}
    for child in children:
        assert child.info.status == ("KILLED" if child.data.params["tune.trial_id"] in stopped else "FINISHED")
        assert "fid_classifier" in child.data.metrics and child.data.params["schedule.recommend"] == "False"
    assert "best_fid_classifier" in parent.data.metrics and "recommended_fid_classifier" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/tune_results.csv", "tune/plots", "tune/best"} <= artifacts


def test_best_config_loads_and_trains(tuned, tmp_path, digits_shards):
    run_dir, _, _ = tuned
    cfg = load_config(run_dir / "tune" / "best_config.yaml", [f"run_dir={tmp_path}", "train.steps=5", "train.log_every=5",
                                                               "train.checkpoint_every=5", "train.sample_every=5"])
    assert not cfg.schedule.recommend
    result = run_training(cfg, digits_shards)
    assert result.metrics["step"] == 5 and len(result.sigmas) == cfg.schedule.num_levels


def test_sampler_only_tuning_of_a_trained_checkpoint(tmp_path, trained_digits, digits_shards):
    _, schedule, checkpoint = trained_digits
    cfg = load_config(ROOT / "configs" / "digits.yaml", [f"run_dir={tmp_path}", "tune.trials=4", "tune.eval_samples=100",
                                                         "tune.steps_per_level=[2,5]", "tracking.system_metrics=false"])
    summary = run_tuning(cfg, digits_shards, checkpoint=str(checkpoint))
    rows = summary.rows
    assert len(rows) == 4 and all(r["objective"] > 0 for r in rows)
    (rec,) = [r for r in rows if r["label"] == "recommended"]  # the checkpoint's own sampler settings, whole schedule
    assert rec["start_level"] == 0 and rec["steps_per_level"] == schedule.steps_per_level
    assert rec["eps"] == pytest.approx(schedule.eps)
    best = load_config(summary.best_config)
    assert best.sampling.eps == pytest.approx(summary.best["eps"]) and best.sampling.steps_per_level == summary.best["steps_per_level"]
    assert summary.next_command.startswith(f"ncsn-pipeline sample --checkpoint {checkpoint}")
    client = MlflowClient(summary.tracking_uri)
    children = client.search_runs([client.get_run(summary.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert sorted(c.data.params["tune.trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    assert all(c.info.status == "FINISHED" and "fid_classifier" in c.data.metrics for c in children)

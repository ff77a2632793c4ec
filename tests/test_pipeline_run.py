"""The end-to-end pipeline (`ncsn-pipeline run`) with a small digits config: directly, and submitted as a Ray job
to a Ray head this test starts on 127.0.0.1 (token authentication on) and stops (issue 8)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.servers import free_port, loopback_status, only_ray_instance

pytestmark = pytest.mark.cluster  # whole pipelines on Ray, from the CLI and as Ray jobs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["train.steps=30", "train.batch_size=32", "train.log_every=10", "train.checkpoint_every=30", "train.sample_every=30",
         "data.loader_workers=0", "tracking.system_metrics=false", "sampling.num_samples=60", "sampling.chunk_size=30",
         "sampling.steps_per_level=2"]

PROGRESS = re.compile(r"step 30/30 +loss [\d.]+ +\d+ img/s +ETA 0m00s")


def _run_args(run_dir: Path | str, config: str = "configs/digits.yaml") -> list[str]:
    return ["ncsn-pipeline", "run", "--config", config, "--no-progress", "--set", f"run_dir={run_dir}",
            *[a for s in SMALL for a in ("--set", s)]]


def _check_outputs(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"fid_classifier", "is_classifier", "kid_classifier", "kid_classifier_low", "kid_classifier_high", "num_samples",
            "same_split_floor_kid_classifier", "train_vs_test_fid_classifier", "gaussian_fid_classifier",
            "classifier_test_accuracy", "extractor_dead_features", "final_loss"} <= set(summary)
    record = summary["evaluation"]["model"]  # each evaluation records its extractor's digest and its counts
    assert record["num_samples"] == 60 and len(record["extractor_id"]) == 16 and set(record["kid"]) == {"value", "low", "high"}
    assert len(list((run_dir / "samples" / "images").glob("*.png"))) == 60
    assert (run_dir / "samples" / "grid.png").exists() and (run_dir / "inpainting" / "inpainting_centre.png").exists()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ncsn").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'digits-pipeline'")
    (child,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.metrics["fid_classifier"] == summary["fid_classifier"] == child.data.metrics["fid_classifier"]
    assert parent.data.params["evaluation.classifier_id"] == child.data.params["evaluation.classifier_id"] == record["extractor_id"]
    assert "loss_per_sigma/000" in child.data.metrics
    assert {"summary", "samples", "inpainting", "trajectory"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_run_pipeline_end_to_end_with_a_small_config(tmp_path):
    # As `make demo` runs it: a run directory relative to the working directory (the Ray workers have their own).
    with only_ray_instance():
        out = subprocess.run([str(BIN / "ncsn-pipeline"), *_run_args("run", str(ROOT / "configs" / "digits.yaml"))[1:]],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample grid:" in out.stdout and "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    assert PROGRESS.search(out.stderr), out.stderr[-3000:]  # rank 0's progress line reaches the console
    assert "Reporting training result" not in out.stderr  # Ray Train's per-report dumps are off without -v
    _check_outputs(tmp_path / "run")


def test_pipeline_submitted_as_a_ray_job_to_a_local_head(tmp_path):
    with only_ray_instance():
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        port, dashboard = free_port(), free_port()
        ray_tmp = tempfile.mkdtemp(prefix="ncsn-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                                 "--temp-dir", ray_tmp], env=env, stdout=open(tmp_path / "head.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            address = f"http://127.0.0.1:{dashboard}"
            deadline = time.time() + 120
            while loopback_status(dashboard, "/api/version") is None:  # any answer (401 without the token) means it is up
                assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(1)
            run_dir = tmp_path / "run"
            submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                                     *_run_args(run_dir)], env=env, capture_output=True, text=True, timeout=900)
            job = re.search(r"Job '(raysubmit_\w+)' succeeded", submit.stdout)
            assert submit.returncode == 0 and job, (submit.stdout + submit.stderr)[-4000:]
            assert PROGRESS.search(submit.stdout)  # and the job's log
            status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job.group(1)], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert f"Job '{job.group(1)}' succeeded" in status.stdout, status.stdout + status.stderr  # as the Jobs API records it
            _check_outputs(run_dir)
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
            shutil.rmtree(ray_tmp, ignore_errors=True)

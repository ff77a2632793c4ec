"""The end-to-end pipeline (`ncsn-pipeline run`) with a small digits config: submitted as a Ray job to a Ray head the
tests start on 127.0.0.1 (token authentication on) and kill, and on two Ray nodes with its shards and Ray
Train's storage on the test's S3 server, where it must give the one-node run's numbers. A CLI that starts its
own local Ray (as `make demo` does) is tested with `ncsn-pipeline tune` and `shard`."""
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

import fsspec
import pytest
import torch
from mlflow.tracking import MlflowClient

from ncsn.checkpoint import load_checkpoint
from pipelines.sample import read_checkpoint
from tests.servers import free_port, loopback_status, only_ray_instance, upload_tree

pytestmark = pytest.mark.cluster  # whole pipelines on Ray, from the CLI and as Ray jobs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["train.steps=20", "train.batch_size=32", "train.log_every=10", "train.checkpoint_every=10", "train.sample_every=20",
         "evaluation.checkpoint_samples=30", "tracking.register_model=digits-small",
         "cluster.num_workers=2", "data.loader_workers=0", "tracking.system_metrics=false", "sampling.num_samples=60",
         "sampling.chunk_size=30", "sampling.steps_per_level=2", "sampling.workers=2"]

PROGRESS = re.compile(r"step 20/20 +loss [\d.]+ +\d+ img/s +ETA 0m00s")


def _run_args(run_dir: Path | str, eval_cache: Path, config: str = "configs/digits.yaml") -> list[str]:
    return ["ncsn-pipeline", "run", "--config", config, "--no-progress", "--set", f"run_dir={run_dir}",
            "--set", f"evaluation.cache_dir={eval_cache}", *[a for s in SMALL for a in ("--set", s)]]


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
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'digits-pipeline'")
    (child,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.metrics["fid_classifier"] == summary["fid_classifier"] == child.data.metrics["fid_classifier"]
    assert parent.data.params["evaluation.classifier_id"] == child.data.params["evaluation.classifier_id"] == record["extractor_id"]
    card = summary["evaluation"]["card"]  # the card on both runs, as tags (a re-evaluation may change it)
    assert parent.data.tags["card.convention"] == child.data.tags["card.convention"] == card["convention"] == "project"
    assert parent.data.tags["card.reference"] == card["reference"] and card["num_samples"] == 60
    assert "loss_per_sigma/000" in child.data.metrics
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


@pytest.fixture(scope="module")
def pipeline_job(tmp_path_factory, eval_cache) -> dict:
    """`ncsn-pipeline run` submitted as a Ray job to a Ray head started here on 127.0.0.1 with token
    authentication on, sharding the configured source itself: the job's log (its driver's stdout and stderr), its status
    as the Jobs API records it and its run directory. One pipeline run, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("job")
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
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                                 *_run_args(run_dir, eval_cache)], env=env, capture_output=True, text=True, timeout=900)
        job = re.search(r"Job '(raysubmit_\w+)' succeeded", submit.stdout)
        assert submit.returncode == 0 and job, (submit.stdout + submit.stderr)[-4000:]
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job.group(1)], env=env,
                                capture_output=True, text=True, timeout=120)
    finally:  # killed, not stopped: the outputs are kept, and a graceful stop of the head takes about 30 s
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"log": submit.stdout, "job": job.group(1), "status": status.stdout + status.stderr, "run_dir": run_dir}


def test_pipeline_submitted_as_a_ray_job_to_a_local_head(pipeline_job):
    assert f"Job '{pipeline_job['job']}' succeeded" in pipeline_job["status"], pipeline_job["status"]  # as the Jobs API records it


def test_run_pipeline_end_to_end_with_a_small_config(pipeline_job):
    log = pipeline_job["log"]
    assert "sample grid:" in log and "mlflow ui --backend-store-uri sqlite:///" in log, log[-3000:]
    assert PROGRESS.search(log), log[-3000:]  # rank 0's progress line reaches the driver's console, and the job's log
    assert "Reporting training result" not in log  # Ray Train's per-report dumps are off without -v
    _check_outputs(pipeline_job["run_dir"])


def test_run_on_two_nodes_with_s3_equals_the_one_node_run_on_local_files(pipeline_job, s3_server, eval_cache, tmp_path):
    # The one-node run's shards and Ray Train's checkpoints on S3, the training workers (one per node) and the sampling
    # actors spread over two nodes, evaluation in a Ray task: the one-node run's metrics (local files, same seeds).
    local_dir = pipeline_job["run_dir"]
    url = upload_tree(str(local_dir / "shards" / "digits"), f"s3://ncsn-test/{tmp_path.name}/shards")
    script = Path(__file__).parent / "scripts" / "two_node_run.py"
    out = subprocess.run([sys.executable, str(script), str(ROOT / "configs" / "digits.yaml"), url, *SMALL,
                          f"run_dir={tmp_path / 'run'}", f"evaluation.cache_dir={eval_cache}",
                          f"cluster.storage_path=s3://ncsn-test/{tmp_path.name}/ray", "tracking.system_metrics=true"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # MLflow's own setting
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    remote = json.loads(lines[0][len("RESULT "):])
    assert len(remote["cluster_nodes"]) == 2 and remote["nodes"]["RayTrainWorker"] == remote["cluster_nodes"]  # one per node
    assert remote["nodes"]["SamplingActor"] == remote["cluster_nodes"]
    # System metrics come from the first worker of each host (Ray Train's local ranks group workers by node IP): both of
    # these Ray nodes are 127.0.0.1, one host, so one monitor and no per-node prefix (system/node<N>/… needs two hosts).
    system = [key for key in remote["logged"] if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and not [key for key in system if key.startswith("system/node")], system
    fs, base = fsspec.core.url_to_fs(f"s3://ncsn-test/{tmp_path.name}/ray/digits")
    assert any(p.endswith("checkpoint.pt") for p in fs.find(base))  # the checkpoints went to the bucket
    local = {k: v for k, v in json.loads((local_dir / "summary.json").read_text()).items() if k not in ("evaluation", "checkpoint")}
    timing = [k for k in local if k.endswith("_per_s")]  # throughputs differ between any two runs
    assert set(remote["metrics"]) == set(local) >= {"fid_classifier", "kid_std_classifier", "final_loss"}
    for key in set(local) - set(timing):
        assert remote["metrics"][key] == pytest.approx(local[key], rel=1e-5, abs=1e-8), key

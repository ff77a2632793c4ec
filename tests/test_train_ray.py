"""Ray Train DDP training on the digits shards: 2 workers on a local Ray (two hosts: test_two_hosts.py), tracked in MLflow."""
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_prep.manifest import load_manifest
from ncsn.checkpoint import load_checkpoint
from pipelines.config import ConfigError, load_config
from pipelines.sample import read_checkpoint
from pipelines.train import CHECKPOINT_FILE, TrainingError, check_storage, check_tracking, resolve_schedule, run_training
from pipelines.train_worker import loss_per_sigma_key
from tests.servers import joining_env, logged_image_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def shards(digits_shards):
    return digits_shards


def _config(run_dir: Path, steps: int):
    return load_config(CONFIGS / "digits.yaml", [f"run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=32", "sampling.steps_per_level=2",
                                                 "train.log_every=5", "train.checkpoint_every=10", "cluster.num_workers=2",
                                                 "train.sample_every=20", "data.loader_workers=0", "tracking.system_metrics=false"])


def _metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def _mlflow_steps(result, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(result.run.tracking_uri).get_metric_history(result.run.run_id, key))


def test_two_worker_ddp_trains_checkpoints_and_resumes(tmp_path, shards, monkeypatch):
    cfg = _config(Path(os.path.relpath(tmp_path)), 20)  # relative, as a user writes it: the workers get it resolved
    given = cfg.to_dict()
    result = run_training(cfg, shards)
    assert cfg.to_dict() == given  # the caller's config is not changed
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    sigmas = resolve_schedule(cfg, load_manifest(shards)).tensor()
    keys = [loss_per_sigma_key(i, s) for i, s in enumerate(sigmas.tolist())]
    assert [k for k in rows[-1] if k.startswith("loss_per_sigma/")] == keys
    assert [r["replica_divergence"] for r in rows if "replica_divergence" in r] == [0.0, 0.0]  # replicas identical
    assert result.model_file == tmp_path.resolve() / "model" / CHECKPOINT_FILE  # the last checkpoint, where README says
    ckpt = load_checkpoint(result.model_file, cfg.model, sigmas)
    assert ckpt.step == 20 and ckpt.ema is not None and ckpt.optimizer["state"]

    # The MLflow run, read back through the client: the whole config, per-σ losses at every logged step,
    # the sample grid, the config file and the final model.
    client = MlflowClient(result.run.tracking_uri)
    run = client.get_run(result.run.run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001" and run.data.params["cluster.num_workers"] == "2"
    assert _mlflow_steps(result) == [5, 10, 15, 20]
    (dataset,) = run.inputs.dataset_inputs  # the shard set, as the run's input
    assert dataset.dataset.digest == load_manifest(shards).digest and shards in dataset.dataset.source
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]
    assert _mlflow_steps(result, keys[-1]) == [5, 10, 15, 20]  # one group in the UI
    assert client.get_metric_history(result.run.run_id, keys[0])[-1].value == pytest.approx(rows[-1][keys[0]])
    assert {a.path for a in client.list_artifacts(result.run.run_id)} >= {"config.yaml", "images"}
    assert logged_image_steps(client, result.run.run_id, "samples") == [20]  # an image with its step (the UI's slider)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run.run_id}'")
    assert [m.name for m in models] == ["model"]
    artifacts = (Path(cfg.run_dir).resolve() / "mlartifacts").as_uri()  # beside mlflow.db, not in ./mlruns
    assert run.info.artifact_uri.startswith(artifacts) and models[0].artifact_location.startswith(artifacts)
    # the model is code + the checkpoint (nothing pickled), and it samples
    logged = Path(models[0].artifact_location.removeprefix("file://"))
    assert not [p for p in logged.rglob("*") if p.suffix in (".pkl", ".pickle", ".pth")], sorted(logged.rglob("*"))
    assert (logged / "artifacts" / CHECKPOINT_FILE).is_file() and (logged / "code" / "ncsn" / "sampling.py").is_file()
    sampler = mlflow.pyfunc.load_model(models[0].artifact_location)  # (mlflow.set_tracking_uri would leak into other tests' env)
    images = sampler.predict(pd.DataFrame({"num_samples": [2, 1], "seed": [0, 1]}))
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    # the checkpoint references sample, inpaint and tune take: the file, the run directory, the logged MLflow model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.run.tracking_uri)
    for reference in (result.model_file, tmp_path, f"runs:/{result.run.run_id}/model"):
        ckpt, _ = read_checkpoint(reference)
        assert ckpt.step == 20 and torch.allclose(ckpt.sigmas, sigmas), reference
    # the command a user runs from MLflow, as training prints it: --no-progress silences MLflow's download bar too
    cli = str(Path(sys.executable).parent / "ncsn-pipeline")
    sampled = subprocess.run([cli, "sample", "--checkpoint", f"runs:/{result.run.run_id}/model", "--num-samples", "2", "--chunk-size", "2",
                              "--workers", "1", "--no-mlflow", "--no-progress", "--output", str(tmp_path / "from-mlflow")],
                             capture_output=True, text=True, timeout=300, env={**joining_env(), "MLFLOW_TRACKING_URI": result.run.tracking_uri})
    assert sampled.returncode == 0 and "2 samples of seed 0" in sampled.stdout, sampled.stderr[-2000:]
    assert "Downloading artifacts" not in sampled.stderr, sampled.stderr[-2000:]

    # Same name, more steps: refused as it is (the settings differ), continued with resume="accept" (--resume) at step 21
    # with the step-20 optimiser state, in the same MLflow run; its final model is registered under the name given.
    more = _config(tmp_path, 30).evolve({"tracking.register_model": "ncsn-digits"})
    with pytest.raises(ConfigError, match=r"^run 'digits' in .* was started with other settings \(train.steps: 20 → 30\): pass --resume"):
        run_training(more, shards)
    resumed = run_training(more, shards, resume="accept")
    (version,) = MlflowClient(resumed.run.tracking_uri).search_model_versions("name = 'ncsn-digits'")
    assert version.run_id == resumed.run.run_id and read_checkpoint(f"models:/ncsn-digits/{version.version}")[0].step == 30
    assert [r["step"] for r in _metrics(tmp_path)] == [5, 10, 15, 20, 25, 30]
    assert resumed.run.run_id == result.run.run_id and _mlflow_steps(resumed) == [5, 10, 15, 20, 25, 30]
    tags = MlflowClient(resumed.run.tracking_uri).get_run(resumed.run.run_id).data.tags
    assert tags["resumed.train.steps"] == "30" and tags["restored_from_step"] == "20"
    with resumed.checkpoint.as_directory() as directory:
        final = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
    assert final.step == 30
    # Adam's own step counters went on from the restored state (20 + 10), not from a fresh optimiser (10)
    assert {int(state["step"]) for state in final.optimizer["state"].values()} == {30}

    # --fresh: a new run from step 0 under the same name; the previous one is moved aside, not deleted. It trains with the
    # sliced objective: SSM differentiates the score w.r.t. the noisy input (create_graph) inside each DDP replica, and
    # the replicas must stay equal.
    sliced = _config(tmp_path, 10).evolve({"train.objective": "ssm"})
    fresh = run_training(sliced, shards, resume="fresh")
    rows = _metrics(tmp_path)
    assert fresh.run.run_id != result.run.run_id and [r["step"] for r in rows] == [5, 10]
    assert all(np.isfinite(r["loss"]) for r in rows) and [r["replica_divergence"] for r in rows if "replica_divergence" in r] == [0.0]
    (kept,) = tmp_path.glob("previous-*")
    assert [r["step"] for r in _metrics(kept)] == [5, 10, 15, 20, 25, 30] and (kept / "model" / CHECKPOINT_FILE).is_file()
    assert len(list((tmp_path / "ray").glob("digits.previous-*"))) == 1
    assert "restored_from_step" not in MlflowClient(fresh.run.tracking_uri).get_run(fresh.run.run_id).data.tags

    # A checkpoint that does not fit the config under the same name: refused on the driver, listing the differences;
    # with --resume every rank fails to restore it, a deterministic failure: one line, no retry.
    wider = sliced.evolve({"model.ngf": 8})
    with pytest.raises(ConfigError, match=r"^run 'digits' .* was started with other settings \(model.ngf: 16 → 8\)"):
        run_training(wider, shards)
    with pytest.raises(TrainingError, match=r"^cannot resume run 'digits': checkpoint .* does not match the model config: model.ngf"):
        run_training(wider, shards, resume="accept")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_same_command_resumes_from_the_last_checkpoint_that_loads(tmp_path, shards):
    # Ray Train's storage on a 12 MB tmpfs: the step-10 checkpoint (7.4 MB) fits, the step-20 one is cut short. Training
    # stops with one line, not Ray's 300-line traceback. What a full disk leaves, Ray Train's checkpoint list emptied
    # (its write is not atomic) and a truncated newest checkpoint, made every later start fail. With space freed, the
    # same command moves the list aside, skips the truncated checkpoint and resumes from step 10.
    from pipelines.train import SNAPSHOT
    from tests.hosts import small_disk

    store = tmp_path / "store"
    with small_disk(store, "12m") as resize:
        cfg = _config(tmp_path / "run", 30).evolve({"cluster.storage_path": str(store), "cluster.max_failures": 0,
                                                     "train.sample_every": 1000})
        with pytest.raises(TrainingError, match=r"^training 'digits' stopped: no space left on a disk it writes \(Ray Train's storage "):
            run_training(cfg, shards)
        (store / "digits" / SNAPSHOT).write_bytes(b"")  # as a full disk leaves it
        resize("64m")  # space freed
        result = run_training(cfg, shards)
        assert [r["step"] for r in _metrics(tmp_path / "run")] == [5, 10, 15, 20, 25, 30] and _mlflow_steps(result) == [5, 10, 15, 20, 25, 30]
        tags = MlflowClient(result.run.tracking_uri).get_run(result.run.run_id).data.tags
        assert tags["restored_from_step"] == "10" and load_checkpoint(result.model_file).step == 30
        assert [p.name.split(".unreadable-")[0] for p in (store / "digits").glob("*.unreadable-*")] == [SNAPSHOT]  # kept, not deleted


def test_local_storage_on_a_multi_host_cluster_is_an_error():
    nodes = [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]
    with pytest.raises(ConfigError, match=r"cluster.storage_path '/data/runs' is a local path, but the Ray cluster spans 2 hosts"):
        check_storage("/data/runs", nodes, shared_filesystem=False)
    check_storage("/data/runs", nodes, shared_filesystem=True)  # NFS mounted everywhere: the user says so
    check_storage("s3://bucket/runs", nodes, shared_filesystem=False)
    check_storage("/data/runs", [{"NodeManagerAddress": "127.0.0.1", "Alive": True}] * 2, shared_filesystem=False)  # one host


def test_a_tracking_file_on_a_multi_host_cluster_is_an_error():
    # rank 0, the checkpoint validations and the evaluation log from any host: a sqlite file is one host's
    nodes = [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]
    for uri in ("sqlite:////data/runs/mlflow.db", "file:///data/mlruns", "/data/mlruns"):
        with pytest.raises(ConfigError, match=rf"^tracking.tracking_uri '{uri}' is a file on this host, but the Ray cluster spans 2 hosts"):
            check_tracking(uri, nodes, shared_filesystem=False)
        check_tracking(uri, nodes, shared_filesystem=True)
        check_tracking(uri, nodes[:1] + [{"NodeManagerAddress": "10.0.0.2", "Alive": False}], shared_filesystem=False)  # one live host
    check_tracking("http://10.0.0.9:5000", nodes, shared_filesystem=False)


def test_config_that_does_not_fit_the_shards_fails_before_training(tmp_path, shards):
    with pytest.raises(ConfigError, match="do not match the shards' images 8×8×1"):
        run_training(load_config(CONFIGS / "digits.yaml", ["model.image_size=32", f"run_dir={tmp_path}"]), shards)
    with pytest.raises(ConfigError, match=r"train.batch_size \(30\) must be divisible by cluster.num_workers \(4\)"):
        run_training(load_config(CONFIGS / "digits.yaml", ["train.batch_size=30", "cluster.num_workers=4", f"run_dir={tmp_path}"]), shards)


def test_a_missing_shard_file_fails_on_the_driver_before_training(tmp_path, shards):
    import shutil

    from data_prep.manifest import ShardError

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = sorted((copy / "train").glob("*.tar"))[0]
    victim.unlink()
    with pytest.raises(ShardError, match=f"1 shard file\\(s\\) listed in {copy}/manifest.json are missing, e.g. {victim}"):
        run_training(load_config(CONFIGS / "digits.yaml", [f"run_dir={tmp_path / 'run'}"]), str(copy))
    assert not (tmp_path / "run" / "ray").exists()  # Ray Train never started


def test_a_non_finite_loss_ends_training_at_once_without_retries(tmp_path, shards):
    # A non-finite loss: every rank stops at the same step and the driver raises it as one line. A retry would restore
    # the step-1 checkpoint (tagging the run restored_from_step) and diverge again; max_failures=2 must not be spent on it.
    cfg = load_config(CONFIGS / "digits.yaml", [f"run_dir={tmp_path / 'nan'}", "train.steps=20", "train.batch_size=32",
                                                "train.checkpoint_every=1", "cluster.num_workers=2", "cluster.max_failures=2",
                                                "data.loader_workers=0", "tracking.system_metrics=false", "optim.lr=1e20"])
    with pytest.raises(TrainingError, match=r"^loss is (nan|inf) at step \d+; "):
        run_training(cfg, shards)
    client = MlflowClient(f"sqlite:///{tmp_path / 'nan' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ncsn").experiment_id])
    assert run.info.status == "FAILED" and "restored_from_step" not in run.data.tags and run.data.tags["failure"].startswith("loss is")
    # (A checkpoint that does not fit the config: test_two_worker_ddp_trains_checkpoints_and_resumes, on its trained run.)


def _replaced_shard(shards: str, copy: Path, split: str) -> Path:
    """``shards`` copied to ``copy``, the first shard of ``split`` then rewritten with every image a valid white PNG (what
    `shard --verify` reports, and what anyone who can write to the bucket could do); returns that shard."""
    import io
    import shutil

    from PIL import Image

    shutil.copytree(shards, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["splits"][split]["shards"][0]["path"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    white = io.BytesIO()
    Image.new("L", (8, 8), 255).save(white, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = white.getvalue() if m.name.endswith(".png") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return shard


def test_a_shard_replaced_in_storage_ends_training_in_one_line_without_retries(tmp_path, shards):
    # The workers' loaders hash what they stream, and training stops on every rank with one line naming the shard.
    copy = tmp_path / "shards"
    shard = _replaced_shard(shards, copy, "train")
    cfg = load_config(CONFIGS / "digits.yaml", [f"run_dir={tmp_path / 'run'}", "train.steps=200", "train.batch_size=32",
                                                "train.checkpoint_every=5", "cluster.num_workers=2", "cluster.max_failures=2",
                                                "data.loader_workers=0", "tracking.system_metrics=false"])
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(shard))}: its sha256 is [0-9a-f]{{16}}…, the manifest's"):
        run_training(cfg, str(copy))
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ncsn").experiment_id])
    assert run.info.status == "FAILED" and "restored_from_step" not in run.data.tags and "sha256" in run.data.tags["failure"]


def test_a_checkpoint_validation_that_fails_is_one_line_on_the_run_and_training_goes_on(tmp_path, shards, caplog):
    # The validation split's shard replaced after sharding, and a fresh evaluation cache, so each checkpoint's validation
    # task reads it: each task fails in one line naming the shard (a warning, and a tag on the training run), training
    # finishes, and with no checkpoint scored model/checkpoint.pt is the last one and the run says so.
    copy = tmp_path / "shards"
    shard = _replaced_shard(shards, copy, "validation")
    cfg = load_config(CONFIGS / "digits.yaml", [f"run_dir={tmp_path / 'run'}", "train.steps=20", "train.batch_size=32",
                                                "train.checkpoint_every=10", "cluster.num_workers=2", "data.loader_workers=0",
                                                "tracking.system_metrics=false", "sampling.steps_per_level=1",
                                                "evaluation.checkpoint_samples=3", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    with caplog.at_level(logging.WARNING, logger="pipelines.train"):
        result = run_training(cfg, str(copy))
    assert [r.getMessage() for r in caplog.records if r.name == "pipelines.train"] == [
        "every checkpoint's validation failed: the training run's tags validation.failed.step_<N> say why"]
    run = MlflowClient(result.run.tracking_uri).get_run(result.run.run_id)
    failed = {k: v for k, v in run.data.tags.items() if k.startswith("validation.failed.")}
    assert run.info.status == "FINISHED" and sorted(failed) == ["validation.failed.step_10", "validation.failed.step_20"], failed
    assert all(v.startswith(f"checkpoint validation of step {k.rsplit('_', 1)[1]} failed: ") and str(shard) in v and "\n" not in v
               for k, v in failed.items()), failed
    assert load_checkpoint(result.model_file).step == 20 and "best_checkpoint" not in run.data.tags
    assert result.describe_choice() == "model: the last checkpoint (step 20); no checkpoint was scored on the validation split"


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    import subprocess
    import sys

    cli = Path(sys.executable).parent / "ncsn-pipeline"
    out = subprocess.run([str(cli), "train", "--config", str(CONFIGS / "digits.yaml"), "--set", "train.lrr=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("ncsn-pipeline train: error: unknown key train.lrr")


def test_a_batch_larger_than_the_training_split_is_refused_on_the_driver(digits_shards, tmp_path):
    # Ray Train retried it three times (136 lines of tracebacks): every worker's loader found too few images for a batch.
    from pipelines.config import ConfigError, load_config
    from pipelines.train import prepare

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml", [f"run_dir={tmp_path}", "train.batch_size=1204"])
    with pytest.raises(ConfigError, match=r"^train.batch_size \(1204\) is larger than the 1203 training images of "):
        prepare(cfg, digits_shards)
    prepare(cfg.evolve({"train.batch_size": 1203}), digits_shards)  # all of them is a batch

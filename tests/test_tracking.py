"""MLflow tracking: a tracking server that goes away mid-training costs nothing, and what it missed is re-sent."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

from mlflow.tracking import MlflowClient
from PIL import Image

from ncsn.checkpoint import Checkpoint
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import Schedule, geometric_sigmas
from pipelines.config import load_config
from pipelines.tracking import METRICS_FILE, RUN_FILE, RunLogger, finish_run, flatten
from pipelines.train import run_training
from tests.servers import AnswerLosingProxy, MlflowServer, joining_env, logged_image_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_training_survives_a_tracking_server_outage_and_resends_what_it_missed(tmp_path, digits_shards):
    server = MlflowServer(tmp_path / "mlflow").start()
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIGS / "digits.yaml", [f"run_dir={run_dir}", "train.steps=30", "train.batch_size=32", "sampling.steps_per_level=2", "train.log_every=5",
                                                "train.checkpoint_every=10", "train.sample_every=10", "data.loader_workers=0",
                                                f"tracking.tracking_uri={server.uri}", "tracking.flush_timeout=120"])
    seen: dict[str, int] = {}

    def outage() -> None:  # down after the first row, back two rows later: rows and grids are logged while it is away
        metrics = run_dir / METRICS_FILE
        while _rows(metrics) < 1:
            time.sleep(0.02)
        server.stop()
        seen["rows_when_stopped"] = _rows(metrics)
        while _rows(metrics) < seen["rows_when_stopped"] + 2:
            time.sleep(0.05)
        seen["rows_when_restarted"] = _rows(metrics)
        server.start()

    watcher = threading.Thread(target=outage)
    watcher.start()
    try:
        result = run_training(cfg, digits_shards)
        watcher.join(120)
        assert seen["rows_when_restarted"] - seen["rows_when_stopped"] >= 2, f"fewer than 2 rows were logged during the outage: {seen}"
        client = MlflowClient(server.uri)
        assert sorted(m.step for m in client.get_metric_history(result.run.run_id, "loss")) == [5, 10, 15, 20, 25, 30]
        assert logged_image_steps(client, result.run.run_id, "samples") == [10, 20, 30]
        # steps 10 and 20: a validation task drew them while training went on; the last, rank 0 (there is nothing left to stall)
        assert [p.name for p in (run_dir / "samples").glob("step_*.png")] == ["step_0000030.png"]
        assert client.get_run(result.run.run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_sync_metrics_sends_only_the_rows_mlflow_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    client.log_metric(run_id, "loss", 3.0, step=5)
    (run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    (run_dir / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 8.0 - s / 5, "grad_norm": 1.0}) + "\n" for s in (5, 10, 15)))
    cli = [str(Path(sys.executable).parent / "ncsn-pipeline"), "sync-metrics", str(run_dir)]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "sent 2 metric rows" in first.stdout, first.stderr
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 3.0), (10, 6.0), (15, 5.0)]
    again = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert "sent 0 metric rows" in again.stdout
    missing = subprocess.run(cli[:-1] + [str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "mlflow_run.json not found" in missing.stderr


def test_config_becomes_mlflow_params_with_dotted_names():
    cfg = load_config(CONFIGS / "digits.yaml")
    params = flatten(cfg.to_dict())
    assert params["optim.lr"] == "0.001" and params["model.arch"] == "ncsnv2" and params["schedule.recommend"] == "True"


def test_the_experiment_opens_in_the_uis_model_training_view(tmp_path):
    # MLflow 3's UI shows an experiment without mlflow.experimentKind in its GenAI view (models as "agent versions", runs as
    # "evaluations"); the pipeline's experiments say they are model training, also one that existed untagged, but a kind
    # someone chose stays.
    from pipelines.tracking import experiment_for_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    new = experiment_for_training(client, "ncsn", uri)
    old = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert [experiment_for_training(client, name, uri) for name in ("ncsn", "older", "chosen")] == [new, old, chosen]
    kinds = [client.get_experiment(e).tags.get("mlflow.experimentKind") for e in (new, old, chosen)]
    assert kinds == ["custom_model_development", "custom_model_development", "genai_development"]
    assert client.get_experiment(new).artifact_location == (tmp_path / "mlartifacts").as_uri()  # beside the store


def test_a_run_that_loses_the_race_to_insert_the_shards_dataset_still_logs_it(tmp_path, monkeypatch):
    # MLflow looks a dataset up, then inserts it: a run starting beside another on the same shards (tuning trials) can find
    # the row missing and then collide with the other's insert (a UNIQUE-constraint error, which errored a trial).
    from mlflow.exceptions import MlflowException

    from data_prep.manifest import Manifest, Split
    from pipelines.tracking import log_shards_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e")
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    real = MlflowClient.log_inputs

    def racing(self, run_id, datasets=None, models=None):  # the other run's insert lands between this one's lookup and insert
        monkeypatch.setattr(MlflowClient, "log_inputs", real)
        real(self, first, datasets=datasets)
        raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    manifest = Manifest(str(tmp_path), "digits", (8, 8, 1), None, {"train": Split(0, ())}, "", None, {}, "0123456789abcdef")
    log_shards_input(uri, second, str(tmp_path), manifest)
    for run_id in (first, second):
        (logged,) = client.get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.name == "digits" and [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]


def test_a_record_whose_answer_was_lost_is_not_logged_twice(tmp_path, monkeypatch, capsys):
    """The server stores a metric row, an image, a file of the model, the finished model and its registration, then dies
    before answering each: the retry asks MLflow first, so each is there once (the model cut short shows as failed);
    the metrics keep the time training logged them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the failure reaches RunLogger at once, not after urllib3's retries
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # as a user's shell has it (restored after)
    server = MlflowServer(tmp_path / "mlflow").start()
    proxy = AnswerLosingProxy(server.port).start()
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("lost-answers")).info.run_id
        # a model file: the attempt fails, and its retry finalizes the unfinished model as FAILED (the first PATCH) before
        # logging it again, which ends with the second PATCH (READY)
        lost = (("POST", "/runs/log-batch"), ("PUT", ".png"), ("PUT", "/artifacts/MLmodel"), ("PATCH", "/logged-models/"),
                ("PATCH", "/logged-models/"), ("POST", "/model-versions/create"))
        for method, path in lost:
            proxy.lose_answer(method, path)
        grid = tmp_path / "grid.png"
        Image.new("L", (8, 8), 128).save(grid)
        sigmas = geometric_sigmas(1.0, 0.01, 3)
        config = ModelConfig("ncsn", 8, 1, 8)
        logger = RunLogger(proxy.uri, run_id, tmp_path, retry_seconds=0.2)
        before = int(time.time() * 1000)
        logger.log_metrics({"step": 5, "loss": 2.0})
        after = int(time.time() * 1000)
        logger.log_image(grid, "samples", 5)
        logger.log_metrics({"step": 10, "loss": 1.0})
        final = Checkpoint(config, Schedule(sigmas, 2e-5, 2), ScoreNetwork(config, sigmas).state_dict(), step=10)
        logger.log_model(final, register_as="lost-answers")
        assert logger.close(timeout=120)
        assert len(proxy.lost) == len(lost), proxy.lost  # each rule fired: records stored whose answers never came
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(5, 2.0), (10, 1.0)]
        assert before <= history[0].timestamp <= after  # the time of logging, not of the re-send after the outage
        assert logged_image_steps(client, run_id, "samples") == [5]
        models = client.search_logged_models([client.get_run(run_id).info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        assert sorted(m.status for m in models) == ["FAILED", "READY"]  # the attempt cut short, the one that finished
        model = next(m for m in models if m.status == "READY")
        assert [v.source for v in client.search_model_versions("name = 'lost-answers'")] == [f"models:/{model.model_id}"]
        assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model left the process's tracking URI as it was
        finish_run(proxy.uri, run_id)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert "View run" not in capsys.readouterr().out  # MLflow's line per ended run; the commands print their own address
    finally:
        proxy.stop()
        server.stop()


def test_sigterm_stops_training_its_run_ends_killed_and_the_same_command_resumes(tmp_path, digits_shards):
    # SIGTERM (what `kill`, a scheduler or Kubernetes sends; Ctrl-C takes the same path) from outside once training logs
    # its first rows: the command exits at once (130), its MLflow run is KILLED, not left RUNNING or called FAILED; the same
    # command again resumes from the last checkpoint and ends FINISHED. It joins the tests' Ray, as on a cluster: the
    # killed driver's job (its Ray Train controller and workers) is Ray's to end.
    import signal

    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "ncsn-pipeline"), "train", "--config", str(CONFIGS / "digits.yaml"), "--shards",
               digits_shards, "--no-progress", *[a for s in (f"run_dir={run_dir}", "train.steps=80", "train.batch_size=32",
                                                             "train.log_every=5", "train.checkpoint_every=10", "train.sample_every=1000",
                                                             "data.loader_workers=0", "tracking.system_metrics=false",
                                                             "sampling.steps_per_level=2")
                                                 for a in ("--set", s)]]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=joining_env())
        try:
            deadline = time.monotonic() + 300
            while _rows(run_dir / METRICS_FILE) < 3 and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=60)
        finally:
            first.kill()
    assert first.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert "ncsn-pipeline train: interrupted; any MLflow run it had open is marked KILLED" in (tmp_path / "first.log").read_text()
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    assert client.get_run(saved["run_id"]).info.status == "KILLED"
    stopped_at = _rows(run_dir / METRICS_FILE)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=joining_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming run" in again.stderr and client.get_run(saved["run_id"]).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(saved["run_id"], "loss"))[-1] == 80 and stopped_at < 16
    # its last lines say what to run next: samples from the checkpoint file, or from MLflow with the tracking URI to set
    from pipelines.sample import read_checkpoint

    sample = f"ncsn-pipeline sample --num-samples 100 --seed 1 --output {run_dir.resolve() / 'samples-seed1'} --checkpoint"
    model_file, model_uri = run_dir.resolve() / "model" / "checkpoint.pt", f"runs:/{saved['run_id']}/model"
    assert again.stdout.splitlines()[-2:] == [f"next: {sample} {model_file}",
                                              f"  or from MLflow: MLFLOW_TRACKING_URI={saved['tracking_uri']} {sample} {model_uri}"], again.stdout
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": saved["tracking_uri"]}):
        assert read_checkpoint(model_uri)[0].step == read_checkpoint(str(model_file))[0].step == 80


def test_the_mlflow_model_counts_its_network_evaluations_on_a_terminal(tmp_path, monkeypatch, capsys):
    """predict() of the logged pyfunc shows one bar over every request's network evaluations (on a terminal), and the
    counting leaves the images those of sample_images with each row's seed."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    import torch

    from ncsn.checkpoint import save_checkpoint
    from ncsn.data import to_stored
    from ncsn.sampling import nfe, sample_images
    from pipelines.mlflow_sampler import NCSNSampler

    config, sigmas = ModelConfig("ncsn", 8, 1, 8), geometric_sigmas(1.0, 0.01, 3)
    path = save_checkpoint(tmp_path / "checkpoint.pt", Checkpoint(config, Schedule(sigmas, 2e-5, 2), ScoreNetwork(config, sigmas).state_dict()))
    sampler = NCSNSampler()
    sampler.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stderr, as a terminal
    images = sampler.predict(None, pd.DataFrame({"num_samples": [2, 1], "seed": [0, 1]}))
    total = 2 * nfe(sampler.schedule)  # two requests of 3 levels x 2 steps + the denoising step
    last = capsys.readouterr().err.split("\r")[-1]
    assert total == 14 and last.startswith("sampling 3 images: 100%") and f" {total}/{total} " in last
    expected = [to_stored(sample_images(sampler.model, (n, 1, 8, 8), sampler.schedule, generator=torch.Generator().manual_seed(seed)).samples)
                for n, seed in ((2, 0), (1, 1))]
    assert np.array_equal(images, np.concatenate(expected))

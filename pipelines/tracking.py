"""MLflow tracking. The driver opens (or finds again) the run and logs the resolved config; rank 0 logs
metrics, sample grids and the final model from a background thread, so a tracking server that goes away
slows nothing and kills nothing: every metric row is first appended to ``metrics.jsonl`` beside the
checkpoints, and rows MLflow has not acknowledged are re-sent when it answers again (or by
``ncsn-pipeline sync-metrics RUN_DIR`` afterwards)."""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import numpy as np
import yaml
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

import ncsn
from data_prep.manifest import Manifest
from ncsn._checks import first_line
from ncsn.atomic import atomic_write
from ncsn.checkpoint import Checkpoint, save_checkpoint
from ncsn.models import ModelConfig
from pipelines.config import Config, ConfigError

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"  # {tracking_uri, run_id} in the run directory
METRICS_FILE = "metrics.jsonl"
RUN_TAG = "ncsn.run_name"
# MLflow's HTTP client retries for minutes by default; a training job should notice an outage sooner. Its "View run"
# lines are left out (the commands print their own address).
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                  "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def tracking_uri(cfg: Config) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the run directory."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside it (<its directory>/mlartifacts), so a run's files stay under its run
    directory instead of ./mlruns of whatever directory the job started in; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def bound_http_requests() -> None:
    """MLflow's HTTP retries and timeout bounded for this process (2 retries, 20 s each), where the user has not set
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT: a dead or hung server fails in about a minute. Its
    "View run … at" lines, printed each time a run on a server ends, are left out: each command prints the address
    that opens its runs in the model-training view (cli.ui_command)."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _client(uri: str):
    bound_http_requests()
    return MlflowClient(tracking_uri=uri)


@contextmanager
def _fluent_tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) aimed at ``uri`` for a while; the process's tracking URI (and
    $MLFLOW_TRACKING_URI, which mlflow.set_tracking_uri also sets) is put back after."""

    bound_http_requests()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 1e-3}} → {"optim.lr": "0.001"}: the config as MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def changed_settings(params: dict[str, str], logged: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, logged value, new value) for every param that differs from a run's logged ones; where the run directory
    is and how tracking is done are not settings of the run."""
    return [(k, logged[k], v) for k, v in sorted(params.items())
            if k in logged and logged[k] != v and k != "run_dir" and not k.startswith("tracking.")]


def _unusable(uri: str, err: Exception) -> ConfigError:
    return ConfigError(f"MLflow tracking at {uri} is not usable: {type(err).__name__}: {first_line(err)}; "
                       "start the server, or unset tracking.tracking_uri / MLFLOW_TRACKING_URI to use the local sqlite store")


def _resumable(cfg: Config, params: dict[str, str], logged: dict[str, str], accept_changes: bool) -> list[tuple[str, str, str]]:
    """The settings that differ from the logged run's; a ConfigError listing them unless ``accept_changes``."""
    differences = changed_settings(params, logged)
    if differences and not accept_changes:
        listed = "; ".join(f"{k}: {old} → {new}" for k, old, new in differences[:5]) + (" …" if len(differences) > 5 else "")
        raise ConfigError(f"run {cfg.name!r} in {cfg.run_dir} was started with other settings ({listed}): pass --resume to "
                          "continue it with these, --fresh to start it anew (the old one is kept aside), or choose another name")
    return differences


def resume_preview(cfg: Config, extra_params: dict[str, str], accept_changes: bool) -> str | None:
    """What opening the run would do to a run this directory already holds, said without changing anything (for
    --dry-run): None for a new run, a line for a resume, the same ConfigError as open_run for changed settings."""
    run_file = Path(cfg.run_dir) / RUN_FILE
    if not run_file.exists():
        return None
    uri = tracking_uri(cfg)
    try:
        client = _client(uri)
        run_id = _existing_run(client, run_file, uri)
        logged = client.get_run(run_id).data.params if run_id else None
    except Exception as err:  # noqa: BLE001 — as open_run: the store cannot be used
        raise _unusable(uri, err) from None
    if logged is None:
        return None
    differences = _resumable(cfg, {**flatten(cfg.to_dict()), **extra_params}, logged, accept_changes)
    changed = f" with changed settings: {', '.join(k for k, _, _ in differences)}" if differences else ""
    last = max(logged_metric_steps(client, run_id), default=0)
    if last >= cfg.train.steps:
        return f"run {cfg.name!r} (MLflow run {run_id}) has trained all {cfg.train.steps} steps: training would do nothing{changed}"
    at = f" (its last logged step is {last} of {cfg.train.steps})" if last else ""
    return f"resumes run {cfg.name!r} (MLflow run {run_id}) from its latest checkpoint{at}{changed}"


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the experiment's kind: model training, not GenAI


def experiment_for_training(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (its artifacts beside the store), and marked as model training
    (EXPERIMENT_KIND) unless it already says what it is. MLflow UIs without the GenAI/model-training toggle choose the
    view from this tag; 3.17's follows the toggle or the address instead (cli.ui_command gives that address)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri), tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def open_run(cfg: Config, extra_params: dict[str, str] | None = None, parent_run_id: str | None = None,
             accept_changes: bool = False) -> tuple[str, str]:
    """Create the MLflow run for ``cfg.name``, or reopen it when the run directory already has one (a resume): only if
    its settings are the config's (else a ConfigError listing the differences), or, with ``accept_changes``, whatever
    changed (recorded as ``resumed.*`` tags). Logs the config as params and as ``config.yaml``;
    returns (tracking URI, run id)."""

    uri = tracking_uri(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    params = {**flatten(cfg.to_dict()), **(extra_params or {})}  # the config, with what the driver resolved (shards, σs)
    try:
        run_id, logged = _existing_run(client, run_dir / RUN_FILE, uri), {}
        if run_id is None:
            experiment_id = experiment_for_training(client, cfg.tracking.experiment, uri)
            tags = {RUN_TAG: cfg.name, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run_id = client.create_run(experiment_id, run_name=cfg.name, tags=tags).info.run_id
            atomic_write(run_dir / RUN_FILE, lambda tmp: tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id})))
        else:
            logged = client.get_run(run_id).data.params
            differences = _resumable(cfg, params, logged, accept_changes)
            log.info("resuming run %r (MLflow run %s) from its latest checkpoint%s", cfg.name, run_id,
                     f" with changed settings: {', '.join(k for k, _, _ in differences)}" if differences else "")
            client.update_run(run_id, status="RUNNING")
        changed = sorted(k for k in params if k in logged and logged[k] != params[k])
        for key in changed:  # MLflow params are immutable; a resumed run with new values records them as tags
            client.set_tag(run_id, f"resumed.{key}", params[key])
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i:i + 100])
        client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 — any client error here means the store cannot be used
        raise _unusable(uri, err) from None
    return uri, run_id


def log_shards_input(uri: str, run_id: str, shards: str, manifest: Manifest) -> None:
    """The shard set as the run's dataset input (context "training"): its location, the manifest's digest, the images'
    schema — what MLflow's UI shows under the run's datasets."""

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (two equal local sources)
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(shards)
    dataset = MetaDataset(source, name=manifest.dataset, digest=manifest.digest,
                          schema=Schema([TensorSpec(np.dtype(np.uint8), (-1, *manifest.image_shape), "image")]))
    inputs, client = [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])], _client(uri)
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:  # MLflow looks the dataset up, then inserts it: runs starting at once (tuning trials) collide;
        client.log_inputs(run_id, datasets=inputs)  # the second look finds the row the other run inserted


def read_run_file(run_file: Path) -> dict | None:
    """{tracking_uri, run_id} from mlflow_run.json; None when it is missing, ValueError when it is damaged."""
    if not run_file.exists():
        return None
    try:
        saved = json.loads(run_file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        saved = None
    if isinstance(saved, dict) and isinstance(saved.get("run_id"), str) and isinstance(saved.get("tracking_uri"), str):
        return saved
    raise ValueError(f"{run_file} is damaged (expected JSON with tracking_uri and run_id)")


def _existing_run(client, run_file: Path, uri: str) -> str | None:
    try:
        saved = read_run_file(run_file)
    except ValueError as err:
        log.warning("%s; a new run is created", err)
        return None
    if saved is None:
        return None
    if saved.get("tracking_uri") != uri:
        log.warning("%s names a run in %s; tracking now goes to %s, so a new run is created there", run_file, saved.get("tracking_uri"), uri)
        return None
    try:
        client.get_run(saved["run_id"])
    except Exception:  # noqa: BLE001 — deleted or unknown run: start a new one
        log.warning("MLflow run %s from %s no longer exists; creating a new run", saved["run_id"], run_file)
        return None
    return saved["run_id"]


def ended_by(err: BaseException) -> str:
    """The status a run stopped by ``err`` ends in: KILLED when the user stopped it (Ctrl-C, SIGTERM), else FAILED."""
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run finished (or FAILED, KILLED); a tracking outage here is logged, not raised."""
    try:
        _client(uri).set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def close_child_runs(uri: str, parent: str, outcome: dict[str, str], key: str = "tune.trial_id", only_running: bool = False) -> None:
    """Give each child run of ``parent`` (``only_running``: each one still RUNNING) the status ``outcome`` names by its
    ``key`` param (FINISHED | KILLED | FAILED; KILLED for one not named); a tracking outage is logged, not raised."""
    try:
        client = _client(uri)
        experiment = client.get_run(parent).info.experiment_id
        for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'"):
            status = outcome.get(run.data.params.get(key), "KILLED")
            if run.info.status != status and (run.info.status == "RUNNING" or not only_running):
                client.set_terminated(run.info.run_id, status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not close the child runs of %s: %s", parent, err)


def log_to_run(uri: str, run_id: str, metrics: dict[str, float] | None = None, artifacts: dict[str, Path] | None = None,
               step: int = 0, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> bool:
    """Add metrics, files ({artifact dir: local path}), params and tags to an existing run, e.g. the training run of a
    checkpoint. Returns False (with a warning naming the problem) when the store cannot take them; the caller's files
    stay. A param the run already holds with another value is kept and named in a warning; the metrics still go."""

    try:
        client = _client(uri)
        if metrics:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        for directory, path in (artifacts or {}).items():
            client.log_artifact(run_id, str(path), directory)
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
    except Exception as err:  # noqa: BLE001
        log.warning("could not log to MLflow run %s at %s: %s: %s", run_id, uri, type(err).__name__, first_line(err, 200))
        return False
    for key, value in (params or {}).items():
        try:
            client.log_param(run_id, key, value)
        except Exception as err:  # noqa: BLE001 — params are immutable in MLflow
            log.warning("MLflow run %s keeps its param %s (not %s): %s", run_id, key, value, first_line(err, 200))
    return True


def log_sampler_model(uri: str, run_id: str, ckpt: Checkpoint, name: str, tags: dict[str, str] | None = None,
                      step: int = 0, params: dict[str, str] | None = None) -> str:
    """``ckpt`` as an MLflow pyfunc that samples (``pipelines/mlflow_sampler.py``, logged as code with the ``ncsn``
    package and the checkpoint as an artifact: loading it unpickles nothing), a LoggedModel of the run at ``step``; its id."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in Ray's worker logs
    with (_fluent_tracking(uri), tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id, log_system_metrics=False),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore", UserWarning)  # no input example (it would sample at log time)
        checkpoint = save_checkpoint(Path(tmp) / "checkpoint.pt", ckpt)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(Path(__file__).with_name("mlflow_sampler.py")),
                                       artifacts={"checkpoint": str(checkpoint)}, code_paths=[str(Path(ncsn.__file__).parent)],
                                       pip_requirements=_requirements(), signature=_sampler_signature(ckpt.model_config), tags=tags,
                                       step=step, params=params)
    return info.model_id


def log_checkpoint_model(uri: str, run_id: str, ckpt: Checkpoint, metrics: dict[str, float], dataset: tuple[str, str]) -> str | None:
    """A scored training checkpoint as a LoggedModel "checkpoint" of the run at its step, with ``metrics`` logged at that
    step and linked to it and to the shard set (``dataset``: name, digest); its id, or None (a warning) when the store
    cannot take it."""
    try:
        model_id = log_sampler_model(uri, run_id, ckpt, "checkpoint", {"ncsn.step": str(ckpt.step)}, ckpt.step, {"step": str(ckpt.step)})
        client, now = _client(uri), int(time.time() * 1000)
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value), now, ckpt.step, dataset_name=dataset[0], dataset_digest=dataset[1],
                              model_id=model_id)
        return model_id
    except Exception as err:  # noqa: BLE001
        log.warning("could not log checkpoint of step %d to MLflow run %s at %s: %s: %s", ckpt.step, run_id, uri, type(err).__name__,
                    first_line(err, 200))
        return None


def _send_image(client, run_id: str, path: Path, key: str, step: int, timestamp: int | None = None) -> None:
    """An image file as the run's MLflow image ``key`` at ``step`` (the UI's image grid with a step slider)."""
    with Image.open(path) as image:
        image.load()
        client.log_image(run_id, image, key=key, step=step, timestamp=timestamp, synchronous=True)


def log_image_file(uri: str, run_id: str, path: Path, key: str, step: int, patience: float = 0.0) -> bool:
    """_send_image, tried again with growing pauses for up to ``patience`` seconds while the store cannot take it (a
    tracking server that is away a while); then a warning and False."""
    deadline, pause = time.monotonic() + patience, 1.0
    while True:
        try:
            _send_image(_client(uri), run_id, path, key, step)
            return True
        except Exception as err:  # noqa: BLE001
            if time.monotonic() + pause > deadline:
                log.warning("could not log image %s of step %d to MLflow run %s at %s: %s", key, step, run_id, uri, first_line(err, 200))
                return False
            time.sleep(pause)
            pause = min(2 * pause, 15.0)


def register_best(uri: str, model_id: str, name: str) -> str:
    """Register the LoggedModel ``model_id`` as a new version of ``name`` with the alias ``best``; the version."""
    with _fluent_tracking(uri):
        version = mlflow.register_model(f"models:/{model_id}", name).version
    _client(uri).set_registered_model_alias(name, "best", str(version))
    return str(version)


def log_child_run(uri: str, parent_run_id: str, name: str, metrics: dict[str, float] | None = None,
                  artifacts: dict[str, Path] | None = None, step: int = 0, params: dict[str, str] | None = None,
                  tags: dict[str, str] | None = None) -> str | None:
    """A finished child run of ``parent_run_id`` (in its experiment, nested under it) holding what an ad-hoc command
    made, so the parent's own metrics are never overwritten; its id, or None (with a warning) when the store cannot
    take it."""
    try:
        client = _client(uri)
        experiment = client.get_run(parent_run_id).info.experiment_id
        child = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent_run_id}).info.run_id
    except Exception as err:  # noqa: BLE001
        log.warning("could not open a child of MLflow run %s at %s: %s: %s", parent_run_id, uri, type(err).__name__, first_line(err, 200))
        return None
    logged = log_to_run(uri, child, metrics, artifacts, step, params, tags)
    try:
        client.set_terminated(child, "FINISHED" if logged else "FAILED")
    except Exception as err:  # noqa: BLE001
        log.warning("could not finish MLflow run %s: %s", child, first_line(err, 200))
    return child if logged else None


def logged_metric_steps(client, run_id: str, key: str = "loss") -> set[int]:
    """The steps at which ``key`` is already recorded in the run."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def read_metric_rows(metrics_file: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line a crash cut short (not JSON, or no integer step) is left out with a warning."""
    rows = []
    if not metrics_file.exists():
        return rows
    for number, line in enumerate(metrics_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("no integer step")
        except ValueError:
            log.warning("%s line %d is incomplete (a write cut short); it is left out", metrics_file, number)
            continue
        rows.append(row)
    return rows


def sync_metrics(uri: str, run_id: str, metrics_file: Path, up_to_step: int | None = None) -> int:
    """Send the rows of ``metrics_file`` whose step MLflow does not have yet; returns how many were sent."""

    client = _client(uri)
    have = logged_metric_steps(client, run_id)
    rows = [r for r in read_metric_rows(metrics_file) if r["step"] not in have and (up_to_step is None or r["step"] <= up_to_step)]
    for row in rows:
        client.log_batch(run_id, metrics=_as_metrics(row, Metric))
    return len(rows)


def _as_metrics(row: dict, metric_cls, timestamp: int | None = None) -> list:
    timestamp = timestamp or int(time.time() * 1000)
    return [metric_cls(k, float(v), timestamp, row["step"]) for k, v in row.items() if k != "step"]


def start_system_metrics(uri: str, run_id: str, node_id: str | None = None):
    """MLflow's system metrics monitor for this node (CPU, memory, disk, network; GPU with the `gpu` extra), every 10 s
    under system/ (system/<node_id>/ when given); stop it with its finish(). None when it cannot start."""
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, node_id=node_id, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 — system metrics are a nicety
        log.warning("system metrics are off: %s", err)
        return None


class RunLogger:
    """Rank 0's MLflow logger: calls queue up and a thread sends them in order, retrying while the server is away.

    ``metrics.jsonl`` is written at once (it is the record); MLflow gets each step once, the first time it is
    logged: after a restore, steps between the checkpoint and the failure keep the values first sent. A call that
    failed is retried only after asking MLflow whether it landed anyway (the answer, not the request, was lost).
    """

    def __init__(self, uri: str, run_id: str, run_dir: Path, resumed_step: int = 0, retry_seconds: float = 10.0):
        self.uri, self.run_id, self.metrics_file = uri, run_id, Path(run_dir) / METRICS_FILE
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)  # rank 0's host need not be the driver's
        self.retry_seconds = retry_seconds
        self._queue: queue.Queue = queue.Queue()
        self._sent: set[int] | None = None  # steps MLflow has; fetched by the thread
        self._down_since: float | None = None
        self._client = _client(uri)
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()
        self._submit(lambda: self._resync(resumed_step))

    def log_metrics(self, row: dict) -> None:
        """Append ``row`` (with its "step") to metrics.jsonl now, and queue it for MLflow."""
        timestamp = int(time.time() * 1000)  # when training logged it, also if an outage delays the sending
        with open(self.metrics_file, "a+b") as f:  # appends go to the end whatever the read position
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # a line a crash cut short stays on its own (read_metric_rows leaves it out)
            f.write((json.dumps(row) + "\n").encode())
        self._submit(lambda: self._send_row(row, timestamp), landed=lambda: self._has_step(row["step"]))

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image file as MLflow's image ``key`` at ``step`` (the UI's image grid with a step slider)."""
        timestamp = int(time.time() * 1000)  # part of the file's name in MLflow, so it can be found again

        def send() -> None:
            _send_image(self._client, self.run_id, path, key, step, timestamp)

        def landed() -> bool:  # MLflow names it images/<key>+step+<step>+timestamp+<timestamp>+<uuid>.png
            prefix = f"images/{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+"
            return any(a.path.startswith(prefix) and a.path.endswith(".png") for a in self._client.list_artifacts(self.run_id, "images"))
        self._submit(send, landed)

    def set_tag(self, key: str, value: str) -> None:
        self._submit(lambda: self._client.set_tag(self.run_id, key, value))

    def log_param(self, key: str, value: str) -> None:
        self._submit(lambda: self._client.log_param(self.run_id, key, value))

    def log_model(self, ckpt: Checkpoint, name: str = "model", register_as: str | None = None) -> None:
        """The final model as an MLflow pyfunc that samples (``pipelines/mlflow_sampler.py``, logged as code with the
        ``ncsn`` package and the checkpoint as an artifact: loading it unpickles nothing); registered as ``register_as``."""
        tags = {"ncsn.log_id": uuid.uuid4().hex}  # finds this model again when an outage hid whether it was logged

        def send() -> None:
            for unfinished in self._models(name, tags, "PENDING"):  # an attempt the outage cut short shows as failed
                self._client.finalize_logged_model(unfinished.model_id, "FAILED")
            log_sampler_model(self.uri, self.run_id, ckpt, name, tags)
        self._submit(send, landed=lambda: bool(self._models(name, tags, "READY")))
        if register_as:
            self._submit(lambda: self._register(name, tags, register_as), landed=lambda: self._registered(name, tags, register_as))

    def close(self, timeout: float = 60.0) -> bool:
        """Wait up to ``timeout`` s for queued calls; returns False (and says how to re-sync) if some remain."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive() or not self._queue.empty():
            log.warning("MLflow at %s did not take everything before shutdown; metrics are in %s — run "
                        "`ncsn-pipeline sync-metrics %s` when it is back", self.uri, self.metrics_file, self.metrics_file.parent)
            return False
        return True

    def _submit(self, call: Callable[[], None], landed: Callable[[], bool] | None = None) -> None:
        """Queue ``call``; ``landed`` (asked before a retry) says whether a failed attempt reached MLflow after all."""
        self._queue.put((call, landed))

    def _resync(self, resumed_step: int) -> None:
        self._sent = logged_metric_steps(self._client, self.run_id)
        if resumed_step:  # rows up to the checkpoint that MLflow missed (e.g. the server was down before a failure)
            sync_metrics(self.uri, self.run_id, self.metrics_file, up_to_step=resumed_step)
            self._sent = logged_metric_steps(self._client, self.run_id)

    def _send_row(self, row: dict, timestamp: int) -> None:
        if row["step"] in self._sent:
            return
        self._client.log_batch(self.run_id, metrics=_as_metrics(row, Metric, timestamp))
        self._sent.add(row["step"])

    def _has_step(self, step: int) -> bool:
        self._sent = logged_metric_steps(self._client, self.run_id)
        return step in self._sent

    def _models(self, name: str, tags: dict[str, str], status: str) -> list:
        """This run's logged models ``name`` that carry ``tags`` and have ``status`` (one per attempt to log it)."""
        experiment = self._client.get_run(self.run_id).info.experiment_id
        models = self._client.search_logged_models([experiment], filter_string=f"source_run_id = '{self.run_id}'")
        return [m for m in models if m.name == name and m.status == status and tags.items() <= m.tags.items()]

    def _register(self, name: str, tags: dict[str, str], register_as: str) -> None:
        logged = self._models(name, tags, "READY")
        if not logged:
            raise RuntimeError(f"model {name!r} of run {self.run_id} was not logged, so it is not registered as {register_as!r}")
        with _fluent_tracking(self.uri):
            mlflow.register_model(f"models:/{logged[0].model_id}", register_as)

    def _registered(self, name: str, tags: dict[str, str], register_as: str) -> bool:
        sources = {f"models:/{m.model_id}" for m in self._models(name, tags, "READY")}
        return bool(sources) and any(v.source in sources for v in self._client.search_model_versions(f"name = '{register_as}'"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            call, landed = item
            retry = False
            while True:
                try:
                    if not (retry and landed is not None and landed()):
                        call()
                    if self._down_since is not None:
                        log.warning("MLflow at %s is reachable again after %.0f s; queued records sent", self.uri, time.time() - self._down_since)
                        self._down_since = None
                    break
                except Exception as err:  # noqa: BLE001 — keep training; retry until it answers
                    if not _unreachable(err):
                        log.error("MLflow call failed and is skipped (%s: %s)", type(err).__name__, first_line(err))
                        break
                    if self._down_since is None:
                        self._down_since = time.time()
                        log.warning("MLflow at %s failed (%s: %s); training continues, metrics stay in %s and are re-sent "
                                    "when it answers", self.uri, type(err).__name__, first_line(err, 200), self.metrics_file)
                    time.sleep(self.retry_seconds)
                    retry = True


_OUTAGE_SIGNS = ("max retries exceeded", "connection refused", "connection aborted", "timed out", "temporarily unavailable",
                 "database is locked", "bad gateway", "service unavailable", "gateway timeout", "name or service not known")


def _unreachable(err: BaseException) -> bool:
    """A failure worth retrying (the store is away or busy), as opposed to a call that can never succeed."""
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError)) or any(s in str(err).lower() for s in _OUTAGE_SIGNS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _requirements() -> list[str]:
    """What the logged model imports, pinned from the running environment (so log_model need not infer them)."""
    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "mlflow", "tqdm")]


def _sampler_signature(model: ModelConfig):
    """Rows of (num_samples, optional seed) in; uint8 images (N, H, W, C) out."""

    return ModelSignature(Schema([ColSpec("long", "num_samples"), ColSpec("long", "seed", required=False)]),
                          Schema([TensorSpec(np.dtype("uint8"), (-1, model.image_size, model.image_size, model.channels))]))

"""NCSN training as a Ray Train job, the driver's side: every check before Ray starts (prepare), the σ schedule, the
MLflow run, the TorchTrainer (Train V2; DDP over gloo on CPU, nccl on GPU) with its storage and failure policy, and the
final checkpoint's local copy. What each worker runs is pipelines.train_worker."""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow
import pyarrow.fs
import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, ValidationConfig
from ray.train.torch import TorchTrainer

from data_prep.loader import check_shards_present
from data_prep.manifest import Manifest, load_manifest
from data_prep.storage import Storage, StorageError, absolute_location, is_url, storage_error
from ncsn.atomic import atomic_write
from ncsn.checkpoint import CheckpointError, RunRef, load_checkpoint
from ncsn.sigmas import Schedule, recommend_schedule
from pipelines import tracking
from pipelines.cluster import connect_ray
from pipelines.checkpoint_validation import CheckpointValidation, best_checkpoint, score_attribute
from pipelines.config import Config, ConfigError
from pipelines.rendezvous import BoundTorchConfig
from pipelines.train_worker import CHECKPOINT_FILE, WorkerSpec, train_loop_per_worker
from pipelines.tune.objective import ObjectiveSpec

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on a failure a retry would repeat (a non-finite loss, a checkpoint that does not fit)."""


def resolve_schedule(cfg: Config, manifest: Manifest) -> Schedule:
    """The σ schedule and the sampler's defaults: σs and ε fixed in the config, or by NCSNv2's rules on the manifest's
    statistics; the sampler, T and denoising from the config."""
    steps, denoise, sampler = cfg.sampling.steps_per_level, cfg.sampling.denoise, cfg.sampling.sampler_spec()
    if not cfg.schedule.recommend:
        return Schedule(cfg.sigmas(), cfg.sampling.eps, steps, denoise, sampler)
    stats = manifest.split("train").statistics
    if stats is None:
        raise ConfigError("schedule.recommend needs the training statistics in the shard manifest; re-run `ncsn-pipeline shard`")
    h, w, c = manifest.image_shape
    rec = recommend_schedule(None, steps, cfg.schedule.sigma_min, sigma_max=stats.max_pairwise_distance, dim=h * w * c)
    return Schedule(rec.sigmas(), rec.eps, steps, denoise, sampler)


def _check_shapes(cfg: Config, manifest: Manifest) -> None:
    h, w, c = manifest.image_shape
    if (h, w, c) != (cfg.model.image_size, cfg.model.image_size, cfg.model.channels):
        raise ConfigError(f"model.image_size/model.channels ({cfg.model.image_size}, {cfg.model.channels}) do not match "
                          f"the shards' images {h}×{w}×{c}; set them to match or re-shard with --resize")


@dataclass
class TrainRun:
    """What a training run leaves: Ray's last checkpoint and metrics, the checkpoint it chose, the MLflow run, the
    schedule it used."""

    checkpoint: object  # ray.train.Checkpoint of the last step (its directory holds checkpoint.pt)
    model_file: Path  # <run_dir>/model/checkpoint.pt: a local copy of the chosen checkpoint (the best validated, else the last)
    metrics: dict
    run: RunRef
    schedule: Schedule
    best: dict | None = None  # the chosen checkpoint's metrics (val_step, val_kid_std_…) when checkpoints were validated

    def describe_choice(self) -> str:
        """Which checkpoint model_file is, and why."""
        last = f"step {self.metrics.get('step')}"
        if not self.best:
            return f"model: the last checkpoint ({last}); no checkpoint was scored on the validation split"
        key = next(k for k in self.best if k.startswith("val_kid_std_") and not k.endswith(("_low", "_high")))
        return (f"model: the checkpoint of step {self.best['val_step']}, lowest {key} on the validation split "
                f"({self.best[key]:.4g} [{self.best[key + '_low']:.4g}, {self.best[key + '_high']:.4g}], "
                f"{self.best.get('val_num_samples', '?')} samples); the last is {last} (model/last.pt)")

    def model_uri(self, registered: str | None = None) -> str:
        """model_file's model in MLflow: ``registered``@best (the name it was registered under), else the chosen checkpoint's
        LoggedModel, else the run's final model."""
        if self.best and self.best.get("val_model_id"):
            return f"models:/{registered}@best" if registered else f"models:/{self.best['val_model_id']}"
        return f"runs:/{self.run.run_id}/model"


def check_storage_url(storage: str) -> None:
    """An object-store ``cluster.storage_path`` that Ray Train (pyarrow) can parse and reach, in a bucket that exists,
    checked on the driver: a ConfigError or StorageError line instead of a controller that dies inside the Ray job."""
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, ValueError) as err:
        raise ConfigError(f"cluster.storage_path {storage!r} is not a URI Ray Train can use: {err}") from None
    try:
        bucket = fs.get_file_info(path.split("/", 1)[0])
    except OSError as err:
        raise storage_error(storage, err) from None
    if bucket.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"cluster.storage_path {storage}: bucket {path.split('/', 1)[0]!r} does not exist; create it first")


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints, in <storage>/<name>/


def recover_checkpoint_list(storage: str, name: str) -> str | None:
    """When Ray Train's list of the run's checkpoints is unreadable (a full disk left it empty or cut short), Ray Train
    fails on every start: the list is moved aside (never deleted) and the newest checkpoint in storage that loads is
    returned, for the workers to restore. None when the list is readable or absent."""
    run = Storage(f"{storage.rstrip('/')}/{name}")
    if not run.exists(SNAPSHOT):
        return None
    text = run.read_bytes(SNAPSHOT)
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    aside = f"{SNAPSHOT}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_bytes_atomic(aside, text)
    run.remove(SNAPSHOT)
    for child in reversed(run.children()):  # checkpoint_<date>_<time>: newest first
        if child.startswith("checkpoint_") and run.exists(f"{child}/{CHECKPOINT_FILE}"):
            try:
                step = load_checkpoint(run.read_bytes(f"{child}/{CHECKPOINT_FILE}"), name=run.path(f"{child}/{CHECKPOINT_FILE}")).step
            except CheckpointError as err:
                log.warning("skipping %s: %s", run.path(child), err)
                continue
            log.warning("Ray Train's checkpoint list %s was unreadable (%d bytes; a full disk?): moved aside to %s; resuming "
                        "from the newest checkpoint in storage that loads, step %d (%s)", run.path(SNAPSHOT), len(text),
                        aside, step, run.path(child))
            return run.path(child)
    log.warning("Ray Train's checkpoint list %s was unreadable (%d bytes): moved aside to %s; no checkpoint in storage loads, "
                "so training starts at step 0", run.path(SNAPSHOT), len(text), aside)
    return None


def no_space_left(err: BaseException) -> bool:
    """Whether a training failure was a full disk: ENOSPC, raised on the driver or quoted from a worker's error."""
    return f"[Errno {errno.ENOSPC}]" in str(err)


def _hosts(nodes: list[dict]) -> list[str]:
    return sorted({n["NodeManagerAddress"] for n in nodes if n.get("Alive")})


def check_storage(storage: str, nodes: list[dict], shared_filesystem: bool) -> None:
    """A local storage path works on one host only: checkpoints written on one node must be readable on the others."""
    hosts = _hosts(nodes)
    if urlparse(storage).scheme in ("", "file") and not shared_filesystem and len(hosts) > 1:
        raise ConfigError(f"cluster.storage_path {storage!r} is a local path, but the Ray cluster spans {len(hosts)} hosts "
                          f"({', '.join(hosts[:4])}); use shared or cloud storage (s3://…, gs://…) or set "
                          "cluster.shared_filesystem: true if the path is mounted on every node")


def check_tracking(uri: str, nodes: list[dict], shared_filesystem: bool) -> None:
    """An MLflow store in a file (sqlite, file:, a path) is on one host's disk, but rank 0, the checkpoint validations
    and the evaluation log from whichever host Ray puts them on: each would write a file of its own."""
    hosts = _hosts(nodes)
    if urlparse(uri).scheme in ("", "file", "sqlite") and not shared_filesystem and len(hosts) > 1:
        raise ConfigError(f"tracking.tracking_uri {uri!r} is a file on this host, but the Ray cluster spans {len(hosts)} hosts "
                          f"({', '.join(hosts[:4])}), whose workers log to it too; run an MLflow server (`mlflow server`) and "
                          "set tracking.tracking_uri to its http:// address, or set cluster.shared_filesystem: true if the "
                          "path is mounted on every node")


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run will use, resolved and checked on the driver before Ray starts."""

    shards: str
    manifest: Manifest
    schedule: Schedule
    storage: str  # Ray Train's storage_path

    def run_params(self) -> dict[str, str]:
        """What the driver resolved, logged beside the config's params (and compared with them on a resume)."""
        return {"schedule.resolved_sigma_max": f"{self.schedule.sigmas[0]:.6g}", "schedule.resolved_num_levels": str(len(self.schedule.sigmas)),
                "sampling.resolved_eps": f"{self.schedule.eps:.6g}", "data.shards": str(self.shards)}

    def describe(self, cfg: Config) -> str:
        """A few lines for --dry-run and --print-config."""
        sigmas = self.schedule.sigmas
        return (f"train {cfg.name!r} for {cfg.train.steps} steps on {cfg.cluster.num_workers} worker(s) "
                f"({'GPU' if cfg.cluster.use_gpu else 'CPU'}), batch {cfg.train.batch_size}\n"
                f"shards: {self.shards} ({self.manifest.split('train').count} training images "
                f"{'×'.join(map(str, self.manifest.image_shape))})\n"
                f"schedule: L = {len(sigmas)} levels, σ {sigmas[0]:.4g} → {sigmas[-1]:.4g}, "
                f"ε = {self.schedule.eps:.4g}, T = {self.schedule.steps_per_level}\n"
                f"checkpoints: {self.storage}/{cfg.name}; run directory: {Path(cfg.run_dir).resolve()}")


def prepare(cfg: Config, shards: str | Manifest, storage_path: str | None = None) -> TrainingPlan:
    """Everything training checks before Ray starts: the shards (present, the config's image size), the batch split,
    the σ schedule and ε, and an object-store storage path (parsable, reachable). ``shards``: their location, or their
    manifest already read."""
    manifest = shards if isinstance(shards, Manifest) else load_manifest(absolute_location(shards))
    shards = manifest.location
    check_shards_present(manifest, "train")  # on the driver: a worker would fail on it, retried for nothing
    _check_shapes(cfg, manifest)
    if cfg.train.batch_size > manifest.split("train").count:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is larger than the {manifest.split('train').count} training images "
                          f"of {shards}", "train.batch_size")
    if cfg.evaluation.checkpoint_samples and "validation" not in manifest.splits:
        raise ConfigError(f"evaluation.checkpoint_samples scores checkpoints on the validation split, which {shards} does not have "
                          "(written before validation splits existed): re-run `ncsn-pipeline shard`, or set it to 0")
    if cfg.train.batch_size % cfg.cluster.num_workers:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by cluster.num_workers ({cfg.cluster.num_workers})")
    schedule = resolve_schedule(cfg, manifest)
    storage = storage_path or cfg.cluster.storage_path or str(Path(cfg.run_dir, "ray").resolve())
    if is_url(storage):
        check_storage_url(storage)
    return TrainingPlan(shards, manifest, schedule, storage)


_PREVIOUS_RUN_FILES = (tracking.RUN_FILE, tracking.METRICS_FILE, "model", "samples", "inpainting", "pipeline", "summary.json", "summary.txt")


def set_aside_previous_run(cfg: Config, storage: str) -> None:
    """For a fresh start under a used name: move the previous run's files (its MLflow link, metrics, model, outputs)
    into <run_dir>/previous-<time>/ and its Ray Train storage to <storage>/<name>.previous-<time>; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, kept = Path(cfg.run_dir), Path(cfg.run_dir) / f"previous-{stamp}"
    for name in _PREVIOUS_RUN_FILES:
        if (run_dir / name).exists():
            kept.mkdir(exist_ok=True)
            (run_dir / name).rename(kept / name)
    experiment = f"{storage.rstrip('/')}/{cfg.name}"
    if is_url(experiment):
        fs, path = fsspec.core.url_to_fs(experiment)
        if fs.exists(path):
            fs.mv(path, f"{path}.previous-{stamp}", recursive=True)
    elif Path(experiment).exists():
        Path(experiment).rename(f"{experiment}.previous-{stamp}")
    log.info("fresh start of run %r: the previous one is in %s and %s.previous-%s", cfg.name, kept, experiment, stamp)


def run_training(cfg: Config, shards: str | Manifest, storage_path: str | None = None, parent_run_id: str | None = None,
                 objective: ObjectiveSpec | None = None, callbacks: list | None = None, extra_params: dict[str, str] | None = None,
                 resume: str = "auto") -> TrainRun:
    """Fit the TorchTrainer for ``cfg`` on the shards, tracked in MLflow (a child run when ``parent_run_id`` is given).
    A run directory that holds a run of this name resumes it: ``resume`` is "auto" (only with the same settings),
    "accept" (with changed ones) or "fresh" (the previous run set aside, a new one started).

    ``objective`` adds KID/FID/IS to rank 0's reports every ``objective.every`` steps (Tune's objective); ``callbacks``
    go to Ray Train (e.g. Tune's TuneReportCallback)."""
    plan = prepare(cfg, shards, storage_path)
    shards, manifest, schedule, storage = plan.shards, plan.manifest, plan.schedule, plan.storage
    cfg = cfg.evolve({"run_dir": str(Path(cfg.run_dir).resolve())})  # workers run in their own directories
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if resume == "fresh":
        set_aside_previous_run(cfg, storage)
    connect_ray()
    check_storage(storage, ray.nodes(), cfg.cluster.shared_filesystem)
    check_tracking(tracking.tracking_uri(cfg), ray.nodes(), cfg.cluster.shared_filesystem)
    uri, run_id = tracking.open_run(cfg, {**plan.run_params(), **(extra_params or {})}, parent_run_id, accept_changes=resume == "accept")
    tracking.log_shards_input(uri, run_id, shards, manifest)
    run = RunRef(uri, run_id)
    validated_by, keep, e = None, CheckpointConfig(num_to_keep=3), cfg.evaluation
    dataset = (manifest.dataset, manifest.digest)
    if e.checkpoint_samples:  # (tuning's trials set it to 0: their own objective scores them)
        validated_by = score_attribute(e.feature_extractor)
        task = CheckpointValidation(ObjectiveSpec(shards, "validation", e.feature_extractor, str(cfg.eval_cache_dir()), e.checkpoint_samples,
                                                  e.resamples, cfg.sampling.denoise, cfg.train.checkpoint_every, e.inception_weights),
                                    cfg.train.seed + 2, uri, run_id, dataset, cfg.tracking.flush_timeout)
        keep = CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=validated_by, checkpoint_score_order="min")  # and the latest
    else:  # a task draws the sample grid of a checkpoint step, off the training workers (a tuning trial's rank 0 samples anyway)
        task = None if objective else CheckpointValidation(None, cfg.train.seed, uri, run_id, dataset, cfg.tracking.flush_timeout)
    validation = None if task is None else ValidationConfig(task, ray_remote_kwargs={
        "num_cpus": cfg.cluster.cpus_per_worker, "num_gpus": 1 if cfg.cluster.use_gpu else 0, "max_retries": 0})
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)  # Ray Train logs every report and checkpoint path at INFO
    spec = WorkerSpec(cfg, schedule, manifest, run, objective, verbose, validated_by, task is not None and task.objective is None,
                      recover_checkpoint_list(storage, cfg.name))
    # Ray Train's preemption watcher (an actor per worker group, restartable, whose creation Ray warns of) only records node
    # drains for ray.train.get_preemption_info, which this loop never reads: a drained node is a lost worker, restored
    # from the latest checkpoint. Off unless the user set it; Ray Train hands the driver's setting to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, spec),
        torch_config=BoundTorchConfig(),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             checkpoint_config=keep, callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level="DEBUG" if verbose else "WARNING")),
        validation_config=validation,
    )
    try:
        result = trainer.fit()
    except BaseException as err:
        tracking.finish_run(uri, run_id, tracking.ended_by(err))
        if no_space_left(err):
            raise TrainingError(f"training {cfg.name!r} stopped: no space left on a disk it writes (Ray Train's storage {storage}, "
                                "or a worker's temporary directory) while saving a checkpoint; free space and run the same "
                                "command: it resumes from the newest checkpoint that loads") from None
        raise
    message = result.return_value  # a deterministic failure ends the run without the retries Ray Train would spend on it
    if message:
        tracking.finish_run(uri, run_id, "FAILED")
        raise TrainingError(message)
    chosen = best_checkpoint(result.best_checkpoints or [], validated_by) if validated_by else None
    model_dir = Path(cfg.run_dir, "model")
    model_dir.mkdir(exist_ok=True)
    for checkpoint, name in ((result.checkpoint, "last.pt"), (chosen[0] if chosen else result.checkpoint, CHECKPOINT_FILE)):
        with checkpoint.as_directory() as directory:  # a local copy, also when checkpoints live in cloud storage
            atomic_write(model_dir / name, lambda tmp: shutil.copyfile(Path(directory) / CHECKPOINT_FILE, tmp))
    trained = TrainRun(result.checkpoint, model_dir / CHECKPOINT_FILE, result.metrics, run, schedule, chosen[1] if chosen else None)
    log.info("%s; %s", trained.describe_choice(), trained.model_file)
    if validated_by and not chosen:
        log.warning("every checkpoint's validation failed: the training run's tags validation.failed.step_<N> say why")
    if chosen:
        tracking.log_to_run(uri, run_id, tags={"best_checkpoint": trained.describe_choice()})
        if cfg.tracking.register_model and chosen[1].get("val_model_id"):
            version = tracking.register_best(uri, chosen[1]["val_model_id"], cfg.tracking.register_model)
            log.info("registered as %s version %s, alias best (models:/%s@best)", cfg.tracking.register_model, version,
                     cfg.tracking.register_model)
    tracking.finish_run(uri, run_id)
    return trained

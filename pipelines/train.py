"""NCSN training as a Ray Train job: TorchTrainer (Train V2), DDP over gloo (CPU) or nccl (GPU),
checkpoints reported by rank 0, every worker reporting in lockstep, restored after worker loss.
Rank 0 logs each report to <run_dir>/metrics.jsonl and to MLflow (pipelines.tracking), with sample grids."""
from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from data_prep.cluster import connect_ray
from data_prep.loader import check_shards_present, make_loader
from data_prep.shard import load_manifest
from data_prep.storage import absolute_location, is_url, storage_error
from ncsn.atomic import atomic_write
from ncsn.checkpoint import Checkpoint, CheckpointError, RunRef, load_checkpoint, save_checkpoint
from ncsn.data import random_hflip, to_unit_interval
from ncsn.ema import EMA
from ncsn.figures import save_image_grid
from ncsn.models import ScoreNetwork
from ncsn.sampling import sample_images
from ncsn.sigmas import Schedule, recommend_schedule
from ncsn.train import NonFiniteLossError, train_steps
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.tune.objective import ObjectiveSpec, sample_and_score

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training stopped on a failure a retry would repeat (a non-finite loss, a checkpoint that does not fit)."""


def resolve_schedule(cfg: Config, manifest: dict) -> Schedule:
    """The σ schedule and the sampler's defaults: σs and ε fixed in the config, or by NCSNv2's rules on the manifest's
    statistics; T and denoising from the config."""
    steps, denoise = cfg.sampling.steps_per_level, cfg.sampling.denoise
    if not cfg.schedule.recommend:
        return Schedule(cfg.sigmas(), cfg.sampling.eps, steps, denoise)
    stats = manifest["splits"]["train"].get("statistics")
    if not stats:
        raise ConfigError("schedule.recommend needs the training statistics in the shard manifest; re-run `ncsn-pipeline shard`")
    h, w, c = manifest["image_shape"]
    rec = recommend_schedule(None, steps, cfg.schedule.sigma_min, sigma_max=stats["max_pairwise_distance"], dim=h * w * c)
    return Schedule(rec.sigmas(), rec.eps, steps, denoise)


def _check_shapes(cfg: Config, manifest: dict) -> None:
    h, w, c = manifest["image_shape"]
    if (h, w, c) != (cfg.model.image_size, cfg.model.image_size, cfg.model.channels):
        raise ConfigError(f"model.image_size/model.channels ({cfg.model.image_size}, {cfg.model.channels}) do not match "
                          f"the shards' images {h}×{w}×{c}; set them to match or re-shard with --resize")


def _sample_grid(model: torch.nn.Module, schedule: Schedule, cfg: Config, step: int, device: torch.device) -> Path:
    """A 10×10 grid from the EMA model (fixed seed, so grids of different steps compare), under <run_dir>/samples."""
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    shape = (100, cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    images = sample_images(model, shape, schedule.tensor(), schedule.eps, schedule.steps_per_level, denoise=schedule.denoise,
                           generator=gen, device=device).samples
    return save_image_grid(images, Path(cfg.run_dir) / "samples" / f"step_{step:07d}.png", nrow=10, scale=max(1, 64 // cfg.model.image_size))


def _load_restored(checkpoint, cfg: Config, sigmas: torch.Tensor, device: torch.device) -> Checkpoint:
    """checkpoint.pt of the Ray Train checkpoint a restarted worker group gets. From object storage each rank downloads
    into a directory of its own, not the one Ray shares between a node's processes behind a file lock (on CI, with S3
    storage, one rank of a restarted group once never got past that restore)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return load_checkpoint(Path(checkpoint.path) / CHECKPOINT_FILE, cfg.model, sigmas, map_location=device)
    with tempfile.TemporaryDirectory(prefix="ncsn-restore-") as tmp:
        return load_checkpoint(Path(checkpoint.to_directory(tmp)) / CHECKPOINT_FILE, cfg.model, sigmas, map_location=device)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep each step once in metrics.jsonl: rows logged after the checkpoint a restart resumes from are replayed,
    and a line a crash cut short is dropped."""
    if path.exists():
        rows = [row for row in tracking.read_metric_rows(path) if row["step"] <= step]
        atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every training worker: the run's config and its schedule (resolved once, on the driver),
    the shards, the MLflow run and Tune's objective (tuning trials only)."""

    config: Config
    schedule: Schedule
    shards: str
    run: RunRef
    objective: ObjectiveSpec | None = None
    verbose: bool = False


class MetricsWindow:
    """Running totals between two reports (loss, per-σ losses, gradient norm, images, time), summed over ranks into
    one metrics row."""

    def __init__(self, num_levels: int, device: torch.device):
        self.level_sum = torch.zeros(num_levels, device=device)
        self.level_count = torch.zeros(num_levels, device=device)
        self.reset()

    def reset(self) -> None:
        self.level_sum.zero_()
        self.level_count.zero_()
        self.loss, self.grad_norm, self.steps, self.images, self.t0 = 0.0, 0.0, 0, 0, time.perf_counter()

    def add(self, stats) -> None:
        """One optimiser step's ncsn.train.StepStats."""
        self.level_sum += stats.per_level_sum.to(self.level_sum.device)
        self.level_count += stats.per_level_count.to(self.level_count.device)
        self.loss, self.grad_norm = self.loss + stats.loss, self.grad_norm + stats.grad_norm
        self.steps, self.images = self.steps + 1, self.images + stats.images

    def row(self, step: int, world: int, skipped: int) -> dict[str, float]:
        """The window's metrics over all ranks (an all-reduce when ``world`` > 1); ``skipped``: this rank's skipped samples."""
        import torch.distributed as dist

        totals = torch.tensor([self.loss, float(self.images), float(skipped)], device=self.level_sum.device)
        if world > 1:
            for t in (self.level_sum, self.level_count, totals):
                dist.all_reduce(t)
        self.seconds_per_step = (time.perf_counter() - self.t0) / self.steps
        metrics = {"step": step, "loss": totals[0].item() / (self.steps * world), "grad_norm": self.grad_norm / self.steps,
                   "images_per_s": totals[1].item() / (self.seconds_per_step * self.steps), "skipped_samples": int(totals[2].item())}
        for i in torch.nonzero(self.level_count).flatten().tolist():
            metrics[f"loss_per_sigma/{i:03d}"] = (self.level_sum[i] / self.level_count[i]).item()
        return metrics


@dataclass
class LossWatch:
    """Says once when a logged loss rises above ``factor`` × the lowest logged so far: training diverged. An Adam blow-up
    can end in a network that outputs 0 (DSM loss D/2) with every loss finite, which would otherwise go unnoticed."""

    factor: float = 2.0
    best: tuple[int, float] | None = None  # (step, loss)
    said: bool = False

    def check(self, step: int, loss: float) -> str | None:
        """The warning for ``loss`` at ``step``, the first time it is due; None otherwise."""
        if self.best is not None and loss > self.factor * self.best[1] and not self.said:
            self.said = True
            return (f"loss {loss:.4g} at step {step} is over {self.factor:g}x its lowest ({self.best[1]:.4g} at step {self.best[0]}): "
                    "training diverged; try optim.grad_clip or a lower optim.lr")
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss)
        return None


def replica_divergence(model: torch.nn.Module, world: int) -> float:
    """The spread of the replicas' parameter checksums: DDP keeps replicas equal, so above 0 means they diverged."""
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world > 1:
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        checksum = torch.cat(gathered)
    return (checksum.max() - checksum.min()).item()


def train_loop_per_worker(spec: WorkerSpec) -> str | None:
    """What each Ray Train worker runs: restore, then train_steps over this rank's shards; at each report a metrics
    row, and on rank 0 tracking, the objective, a sample grid and the checkpoint; every rank reports in lockstep.
    Returns the message of a deterministic failure, the same on every rank (Ray Train hands rank 0's to the driver)."""
    import ray.train
    import ray.train.torch

    if not spec.verbose:  # Ray Train logs every report (22 per-σ losses) and every checkpoint's path at INFO
        from ray.train.v2._internal.execution import context as train_context
        from ray.train.v2._internal.execution import storage as train_storage

        for module in (train_context, train_storage):
            module.logger.setLevel(logging.WARNING)
    cfg, schedule, sigmas = spec.config, spec.schedule, spec.schedule.tensor()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # the model, its optimiser and EMA: fresh (the same seed on every rank) or restored from Ray Train's checkpoint
    torch.manual_seed(cfg.train.seed)
    model = ScoreNetwork(cfg.model, sigmas).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay, amsgrad=cfg.optim.amsgrad)
    ema = EMA(model, cfg.train.ema_decay)
    start = 0
    restored = ray.train.get_checkpoint()
    if restored:
        try:
            ckpt = _load_restored(restored, cfg, sigmas, device)
        except CheckpointError as err:  # every rank reads the same file: all stop, nothing to retry
            return f"cannot resume run {cfg.name!r}: {err}"
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        optimizer.load_state_dict(ckpt.optimizer)
        start = ckpt.step
        if rank == 0:
            _drop_metrics_after(Path(cfg.run_dir) / tracking.METRICS_FILE, start)
            log.info("resumed from step %d", start)

    # rank 0 reports: MLflow and metrics.jsonl, and Tune's objective
    run_log, evaluator = None, None
    if rank == 0:
        run_log = tracking.RunLogger(spec.run.tracking_uri, spec.run.run_id, Path(cfg.run_dir), resumed_step=start)
        if start:
            run_log.set_tag("restored_from_step", str(start))
        if spec.objective:
            evaluator = spec.objective.evaluator()
            run_log.log_param(f"evaluation.{evaluator.extractor}_id", evaluator.extractor_id)

    # system metrics from every host, by its first worker (Ray Train's local ranks are per node IP; keys system/node<N>/…
    # when the run spans several hosts)
    monitor = None
    if cfg.tracking.system_metrics and ctx.get_local_rank() == 0:
        several = ctx.get_local_world_size() < world
        monitor = tracking.start_system_metrics(spec.run.tracking_uri, spec.run.run_id, f"node{ctx.get_node_rank()}" if several else None)

    # the data and the steps
    torch.manual_seed(cfg.train.seed * 100_003 + rank * 1009 + start)  # noise and levels differ per rank and segment
    ddp_model = ray.train.torch.prepare_model(model)
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    loader = make_loader(spec.shards, cfg.train.batch_size // world, rank, world, resampled=True, num_workers=cfg.data.loader_workers,
                         shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed * 7919 + start)

    def batches():
        while True:
            for images, _ in loader:
                yield images

    def transform(x: torch.Tensor) -> torch.Tensor:
        x = to_unit_interval(x, dequantize=cfg.data.dequantize)
        return random_hflip(x) if cfg.data.random_flip else x

    fatal: list[str] = []

    def steps():
        """train_steps, ending (on every rank at the same step) at a non-finite loss, which a retry would only repeat."""
        try:
            yield from train_steps(ddp_model, batches(), sigmas, optimizer, num_steps=cfg.train.steps, start_step=start, ema=ema,
                                   grad_clip=cfg.optim.grad_clip, transform=transform, amp=amp, scaler=scaler,
                                   objective=cfg.train.objective)
        except NonFiniteLossError as err:
            fatal.append(str(err))

    window, watch = MetricsWindow(len(sigmas), device), LossWatch()
    for stats in steps():
        window.add(stats)
        step, last = stats.step, stats.step == cfg.train.steps
        checkpoint_now = step % cfg.train.checkpoint_every == 0 or last
        if step % cfg.train.log_every != 0 and not checkpoint_now:
            continue
        metrics = window.row(step, world, loader.skipped)
        if checkpoint_now:
            metrics["replica_divergence"] = replica_divergence(model, world)
        if evaluator is not None and (step % spec.objective.every == 0 or last):  # a fixed seed, so trials compare
            metrics.update(sample_and_score(evaluator, ema.model, sigmas, schedule.eps, schedule.steps_per_level, spec.objective,
                                            seed=cfg.train.seed + 1, device=device)[0])
        if rank == 0:
            run_log.log_metrics(metrics)
            if diverged := watch.check(step, metrics["loss"]):
                log.warning(diverged)
                run_log.set_tag("diverged", diverged)
            if step % cfg.train.sample_every == 0 or last:
                run_log.log_image(_sample_grid(ema.model, schedule, cfg, step, device), "samples", step)
            eta = (cfg.train.steps - step) * window.seconds_per_step
            log.info("step %d/%d  loss %.4f  %.0f img/s  ETA %dm%02ds", step, cfg.train.steps, metrics["loss"],
                     metrics["images_per_s"], eta // 60, eta % 60)
        with tempfile.TemporaryDirectory() as tmp:
            report_ckpt = None
            if checkpoint_now and rank == 0:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, Checkpoint(cfg.model, schedule, model.state_dict(), ema.state_dict(),
                                                                        optimizer.state_dict(), step, spec.run))
                report_ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=report_ckpt)
        window.reset()

    # the end: a deterministic failure ends the run without retries; otherwise rank 0 logs the model
    if monitor is not None:
        monitor.finish()
    if fatal:
        if rank == 0:
            run_log.set_tag("failure", fatal[0])
            run_log.close(timeout=cfg.tracking.flush_timeout)
        return fatal[0]
    if rank == 0:
        if start < cfg.train.steps:
            run_log.log_model(Checkpoint(cfg.model, schedule, {k: v.cpu() for k, v in ema.state_dict().items()}, step=step),
                              register_as=cfg.tracking.register_model)
        run_log.close(timeout=cfg.tracking.flush_timeout)
    return None


@dataclass
class TrainRun:
    """What a training run leaves: Ray's last checkpoint and metrics, the MLflow run, the schedule it used."""

    checkpoint: object  # ray.train.Checkpoint (its directory holds checkpoint.pt)
    model_file: Path  # <run_dir>/model/checkpoint.pt: a local copy of that checkpoint
    metrics: dict
    run: RunRef
    schedule: Schedule


def check_storage_url(storage: str) -> None:
    """An object-store ``cluster.storage_path`` that Ray Train (pyarrow) can parse and reach, checked on the driver: a
    ConfigError or StorageError line instead of a controller that dies inside the Ray job."""
    import pyarrow
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, ValueError) as err:
        raise ConfigError(f"cluster.storage_path {storage!r} is not a URI Ray Train can use: {err}") from None
    try:
        fs.get_file_info(path)
    except OSError as err:
        raise storage_error(storage, err) from None


def check_storage(storage: str, nodes: list[dict], shared_filesystem: bool) -> None:
    """A local storage path works on one host only: checkpoints written on one node must be readable on the others."""
    if urlparse(storage).scheme not in ("", "file") or shared_filesystem:
        return
    hosts = sorted({n["NodeManagerAddress"] for n in nodes if n.get("Alive")})
    if len(hosts) > 1:
        raise ConfigError(f"cluster.storage_path {storage!r} is a local path, but the Ray cluster spans {len(hosts)} hosts "
                          f"({', '.join(hosts[:4])}); use shared or cloud storage (s3://…, gs://…) or set "
                          "cluster.shared_filesystem: true if the path is mounted on every node")


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run will use, resolved and checked on the driver before Ray starts."""

    shards: str
    manifest: dict
    schedule: Schedule
    storage: str  # Ray Train's storage_path

    def describe(self, cfg: Config) -> str:
        """A few lines for --dry-run and --print-config."""
        sigmas = self.schedule.sigmas
        return (f"train {cfg.name!r} for {cfg.train.steps} steps on {cfg.cluster.num_workers} worker(s) "
                f"({'GPU' if cfg.cluster.use_gpu else 'CPU'}), batch {cfg.train.batch_size}\n"
                f"shards: {self.shards} ({self.manifest['splits']['train']['count']} training images "
                f"{'×'.join(map(str, self.manifest['image_shape']))})\n"
                f"schedule: L = {len(sigmas)} levels, σ {sigmas[0]:.4g} → {sigmas[-1]:.4g}, "
                f"ε = {self.schedule.eps:.4g}, T = {self.schedule.steps_per_level}\n"
                f"checkpoints: {self.storage}/{cfg.name}; run directory: {Path(cfg.run_dir).resolve()}")


def local_shards(cfg: Config) -> Path:
    """Where shards_for writes the configured source when no shard location is given."""
    return Path(cfg.run_dir).resolve() / "shards" / cfg.data.source


def shards_for(cfg: Config, shards: str | None = None, progress: bool = True) -> str:
    """The shards a run uses: ``shards``, else data.shards, else the configured source sharded into
    <run_dir>/shards/<source> (a no-op when those are up to date)."""
    from data_prep.shard import ShardOptions, shard_dataset

    if shards or cfg.data.shards:
        return shards or cfg.data.shards
    out = str(local_shards(cfg))
    options = ShardOptions(cfg.data.source, cfg.data.input, shard_size=cfg.data.shard_size, crop=cfg.data.crop,
                           resize=cfg.data.resize, channels=cfg.model.channels)
    log.info(shard_dataset(options, out, progress=progress).line())
    return out


def prepare(cfg: Config, shards: str, storage_path: str | None = None) -> TrainingPlan:
    """Everything training checks before Ray starts: the shards (present, the config's image size), the batch split,
    the σ schedule and ε, and an object-store storage path (parsable, reachable)."""
    shards = absolute_location(shards)
    manifest = load_manifest(shards)
    check_shards_present(manifest, shards, "train")  # on the driver: a worker would fail on it, retried for nothing
    _check_shapes(cfg, manifest)
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
        import fsspec

        fs, path = fsspec.core.url_to_fs(experiment)
        if fs.exists(path):
            fs.mv(path, f"{path}.previous-{stamp}", recursive=True)
    elif Path(experiment).exists():
        Path(experiment).rename(f"{experiment}.previous-{stamp}")
    log.info("fresh start of run %r: the previous one is in %s and %s.previous-%s", cfg.name, kept, experiment, stamp)


def run_training(cfg: Config, shards: str, storage_path: str | None = None, parent_run_id: str | None = None,
                 objective: ObjectiveSpec | None = None, callbacks: list | None = None, extra_params: dict[str, str] | None = None,
                 resume: str = "auto") -> TrainRun:
    """Fit the TorchTrainer for ``cfg`` on the shards, tracked in MLflow (a child run when ``parent_run_id`` is given).
    A run directory that holds a run of this name resumes it: ``resume`` is "auto" (only with the same settings),
    "accept" (with changed ones) or "fresh" (the previous run set aside, a new one started).

    ``objective`` adds FID/IS/KID to rank 0's reports every ``objective.every`` steps (Tune's objective); ``callbacks`` go to Ray Train (e.g. Tune's TuneReportCallback)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.rendezvous import BoundTorchConfig

    plan = prepare(cfg, shards, storage_path)
    shards, manifest, schedule, storage = plan.shards, plan.manifest, plan.schedule, plan.storage
    cfg = cfg.evolve({"run_dir": str(Path(cfg.run_dir).resolve())})  # workers run in their own directories
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if resume == "fresh":
        set_aside_previous_run(cfg, storage)
    connect_ray()
    check_storage(storage, ray.nodes(), cfg.cluster.shared_filesystem)
    uri, run_id = tracking.open_run(cfg, {"schedule.resolved_sigma_max": f"{schedule.sigmas[0]:.6g}",
                                          "schedule.resolved_num_levels": str(len(schedule.sigmas)),
                                          "sampling.resolved_eps": f"{schedule.eps:.6g}", "data.shards": str(shards), **(extra_params or {})},
                                   parent_run_id, resume="accept" if resume == "accept" else "auto")
    tracking.log_shards_input(uri, run_id, shards, manifest)
    run = RunRef(uri, run_id)
    spec = WorkerSpec(cfg, schedule, str(shards), run, objective,
                      verbose=logging.getLogger().isEnabledFor(logging.DEBUG))
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, spec),
        torch_config=BoundTorchConfig(),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3), callbacks=callbacks or []),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    message = result.return_value  # a deterministic failure ends the run without the retries Ray Train would spend on it
    if message:
        tracking.finish_run(uri, run_id, "FAILED")
        raise TrainingError(message)
    tracking.finish_run(uri, run_id)
    model_file = Path(cfg.run_dir, "model", CHECKPOINT_FILE)
    model_file.parent.mkdir(exist_ok=True)
    with result.checkpoint.as_directory() as directory:  # a local copy, also when checkpoints live in cloud storage
        atomic_write(model_file, lambda tmp: shutil.copyfile(Path(directory) / CHECKPOINT_FILE, tmp))
    log.info("final checkpoint: %s", model_file)
    return TrainRun(result.checkpoint, model_file, result.metrics, run, schedule)

"""What every Ray Train worker runs, top to bottom: build or restore the model, open rank 0's record (MLflow,
metrics.jsonl, Tune's objective) and each host's system metrics, then train_steps over this rank's shards; at each
report a metrics row, on rank 0 tracking, the objective, a sample grid and the checkpoint; every rank reports in lockstep."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data_prep.loader import make_loader
from data_prep.manifest import Manifest, ShardError
from ncsn._checks import first_line
from ncsn.atomic import atomic_write
from ncsn.checkpoint import Checkpoint, CheckpointError, RunRef, load_checkpoint, save_checkpoint
from ncsn.data import random_hflip, to_unit_interval
from ncsn.ema import EMA
from ncsn.images import save_image_grid
from ncsn.models import ScoreNetwork
from ncsn.sampling import sample_images
from ncsn.sigmas import Schedule
from ncsn.train import NonFiniteLossError, train_steps
from pipelines import tracking
from pipelines.config import Config
from pipelines.tune.objective import ObjectiveSpec, sample_and_score

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every training worker: the run's config and its schedule (resolved once, on the driver),
    the shards' manifest (read once, on the driver), the MLflow run and Tune's objective (tuning trials only)."""

    config: Config
    schedule: Schedule
    manifest: Manifest
    run: RunRef
    objective: ObjectiveSpec | None = None
    verbose: bool = False  # -v: Ray Train's per-report lines too
    validated_by: str | None = None  # checkpoints are scored by a validation task, ranked by this metric (lower is better)
    grid_by_validation: bool = False  # a checkpoint at a grid step goes to a validation task that draws the grid
    fallback: str | None = None  # the checkpoint to restore while Ray Train has none (its own list was unreadable)


def loss_per_sigma_key(level: int, sigma: float) -> str:
    """The metric of level ``level``'s loss: its index (charts sort by name) and its σ, e.g. ``loss_per_sigma/003_0.129``."""
    return f"loss_per_sigma/{level:03d}_{sigma:.3g}"


class MetricsWindow:
    """Running totals between two reports (loss, per-σ losses, gradient norm, images, time), summed over ranks into
    one metrics row."""

    def __init__(self, sigmas: Sequence[float], device: torch.device):
        self.keys = [loss_per_sigma_key(i, float(s)) for i, s in enumerate(sigmas)]
        self.level_sum = torch.zeros(len(self.keys), device=device)
        self.level_count = torch.zeros(len(self.keys), device=device)
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
        totals = torch.tensor([self.loss, float(self.images), float(skipped)], device=self.level_sum.device)
        if world > 1:
            for t in (self.level_sum, self.level_count, totals):
                dist.all_reduce(t)
        self.seconds_per_step = (time.perf_counter() - self.t0) / self.steps
        metrics = {"step": step, "loss": totals[0].item() / (self.steps * world), "grad_norm": self.grad_norm / self.steps,
                   "images_per_s": totals[1].item() / (self.seconds_per_step * self.steps), "skipped_samples": int(totals[2].item())}
        for i in torch.nonzero(self.level_count).flatten().tolist():
            metrics[self.keys[i]] = (self.level_sum[i] / self.level_count[i]).item()
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
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world > 1:
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        checksum = torch.cat(gathered)
    return (checksum.max() - checksum.min()).item()


def grid_samples(model: ScoreNetwork, schedule: Schedule, seed: int, device: torch.device) -> torch.Tensor:
    """The 100 images of a sample grid from ``model`` with its sampler (a fixed seed, so grids of different steps compare)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = model.config
    shape = (100, cfg.channels, cfg.image_size, cfg.image_size)
    return sample_images(model, shape, schedule, generator=gen, device=device, levels_only=model.levels_only).samples


def _load_restored(checkpoint, cfg: Config, sigmas: torch.Tensor, device: torch.device) -> Checkpoint:
    """checkpoint.pt of the Ray Train checkpoint a restarted worker group gets. From object storage each rank downloads
    into a directory of its own, not the one Ray shares between a node's processes behind a file lock, on which a rank
    of a restarted group can wait for ever."""
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


@dataclass
class Model:
    """A worker's model, its optimiser and EMA, and the step they are at."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    start: int


def build_or_restore(cfg: Config, sigmas: torch.Tensor, device: torch.device, rank: int, fallback: str | None = None) -> Model | str:
    """The model, optimiser and EMA: fresh (the same seed on every rank) or restored from Ray Train's checkpoint, else
    from ``fallback``; a checkpoint that does not fit is a message, the same on every rank (every rank reads the same file)."""
    torch.manual_seed(cfg.train.seed)
    net = ScoreNetwork(cfg.model, sigmas).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay, amsgrad=cfg.optim.amsgrad)
    model = Model(net, optimizer, EMA(net, cfg.train.ema_decay), 0)
    restored = ray.train.get_checkpoint() or (ray.train.Checkpoint(fallback) if fallback else None)
    if restored:
        try:
            ckpt = _load_restored(restored, cfg, sigmas, device)
        except CheckpointError as err:
            return f"cannot resume run {cfg.name!r}: {err}"
        try:
            net.load_state_dict(ckpt.model)
            model.ema.load_state_dict(ckpt.ema)
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, RuntimeError, KeyError) as err:  # the same file on every rank: all stop, nothing to retry
            return f"cannot resume run {cfg.name!r}: its checkpoint's state does not fit this model or optimiser ({first_line(err, 200)})"
        model.start = ckpt.step
        if rank == 0:
            _drop_metrics_after(Path(cfg.run_dir) / tracking.METRICS_FILE, model.start)
            log.info("resumed from step %d", model.start)
    return model


class Record:
    """Rank 0's record of the run (MLflow and metrics.jsonl, Tune's objective, the loss watch), and each host's system
    metrics from its first worker (Ray Train's local ranks are per node IP; keys system/node<N>/… when the run spans
    several hosts). On other ranks the parts are None."""

    def __init__(self, spec: WorkerSpec, ctx, start: int):
        cfg, rank, world = spec.config, ctx.get_world_rank(), ctx.get_world_size()
        self.log, self.evaluator, self.monitor, self.watch = None, None, None, LossWatch()
        if rank == 0:
            self.log = tracking.RunLogger(spec.run.tracking_uri, spec.run.run_id, Path(cfg.run_dir), resumed_step=start)
            if start:
                self.log.set_tag("restored_from_step", str(start))
            if spec.objective:
                self.evaluator = spec.objective.evaluator()
                self.log.log_param(f"evaluation.{self.evaluator.extractor}_id", self.evaluator.extractor_id)
        if cfg.tracking.system_metrics and ctx.get_local_rank() == 0:
            several = ctx.get_local_world_size() < world
            self.monitor = tracking.start_system_metrics(spec.run.tracking_uri, spec.run.run_id,
                                                         f"node{ctx.get_node_rank()}" if several else None)

    def write(self, metrics: dict, spec: WorkerSpec, ema_model: torch.nn.Module, step: int, inline_grid: bool,
              seconds_per_step: float, device: torch.device) -> None:
        """Rank 0: log the row, warn once on divergence, draw and log a sample grid that no validation task draws, print
        the progress line."""
        cfg = spec.config
        self.log.log_metrics(metrics)
        if diverged := self.watch.check(step, metrics["loss"]):
            log.warning(diverged)
            self.log.set_tag("diverged", diverged)
        if inline_grid:
            grid = save_image_grid(grid_samples(ema_model, spec.schedule, cfg.train.seed, device),
                                   Path(cfg.run_dir) / "samples" / f"step_{step:07d}.png", nrow=10)
            self.log.log_image(grid, "samples", step)
        eta = (cfg.train.steps - step) * seconds_per_step
        log.info("step %d/%d  loss %.4f  %.0f img/s  ETA %dm%02ds", step, cfg.train.steps, metrics["loss"],
                 metrics["images_per_s"], eta // 60, eta % 60)

    def close(self, spec: WorkerSpec, model: Model, step: int, failure: str | None) -> None:
        """The end: system metrics stop; rank 0 tags a failure, or logs the EMA model (when this segment trained), and
        flushes what the tracking server has not taken yet."""
        cfg = spec.config
        if self.monitor is not None:
            self.monitor.finish()
        if self.log is None:
            return
        if failure:
            self.log.set_tag("failure", failure)
        elif model.start < cfg.train.steps:
            ema = {k: v.cpu() for k, v in model.ema.state_dict().items()}
            register = None if spec.validated_by else cfg.tracking.register_model  # else the driver registers the best checkpoint
            self.log.log_model(Checkpoint(cfg.model, spec.schedule, ema, step=step), register_as=register)
        self.log.close(timeout=cfg.tracking.flush_timeout)


def train_loop_per_worker(spec: WorkerSpec) -> str | None:
    """What each Ray Train worker runs (the module docstring). Returns the message of a deterministic failure, the same
    on every rank (Ray Train hands rank 0's to the driver)."""
    _quiet_report_dumps(spec.verbose)
    cfg, schedule, sigmas = spec.config, spec.schedule, spec.schedule.tensor()
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    model = build_or_restore(cfg, sigmas, device, rank, spec.fallback)
    if isinstance(model, str):
        return model
    record = Record(spec, ctx, model.start)

    torch.manual_seed(cfg.train.seed * 100_003 + rank * 1009 + model.start)  # noise and levels differ per rank and segment
    ddp_model = ray.train.torch.prepare_model(model.net)
    loader = make_loader(spec.manifest, cfg.train.batch_size // world, rank, world, resampled=True, num_workers=cfg.data.loader_workers,
                         shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed * 7919 + model.start)
    failure: list[str] = []
    window, step = MetricsWindow(sigmas.tolist(), device), model.start
    for stats in _steps(ddp_model, loader, model, cfg, sigmas, device, failure):
        window.add(stats)
        step, last = stats.step, stats.step == cfg.train.steps
        checkpoint_now = step % cfg.train.checkpoint_every == 0 or last
        grid_now = step % cfg.train.sample_every == 0 or last
        if step % cfg.train.log_every != 0 and not checkpoint_now:
            continue
        metrics = window.row(step, world, loader.skipped)
        if checkpoint_now:
            metrics["replica_divergence"] = replica_divergence(model.net, world)
        if record.evaluator is not None and (step % spec.objective.every == 0 or last):  # a fixed seed, so trials compare
            metrics.update(sample_and_score(record.evaluator, model.ema.model, schedule, spec.objective, seed=cfg.train.seed + 1,
                                            device=device)[0])
        # a validation task draws the grid of a checkpoint step, but the last: no training is left for it to stall
        validate = bool(spec.validated_by) or (spec.grid_by_validation and grid_now and not last)
        if record.log is not None:
            record.write(metrics, spec, model.ema.model, step, grid_now and not (checkpoint_now and validate), window.seconds_per_step,
                         device)
        _report(metrics, spec, model, step, checkpoint_now and rank == 0, validate)
        window.reset()
    record.close(spec, model, step, failure[0] if failure else None)
    return failure[0] if failure else None


class _WithoutReportDumps(logging.Filter):
    """Drops Ray Train's "Reporting training result …" line (every report's 22 per-σ losses). Ray names that module's
    logger by its file path, not under ``ray.train``, so RunConfig's LoggingConfig does not reach it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Reporting training result")


def _quiet_report_dumps(verbose: bool) -> None:
    if not verbose:
        for handler in logging.getLogger().handlers:  # Ray Train's console and file handlers on the root logger
            handler.addFilter(_WithoutReportDumps())


def agreed_batches(loader, device: torch.device):
    """The loader's batches, endlessly, while every rank has one: a ShardError on any rank (a shard whose sha256 is not
    the manifest's) is raised on every rank at the same batch, with that rank's message, so none waits in an all-reduce."""
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    batches = iter(())
    while True:
        try:
            (images, _), message = next(batches), ""
        except StopIteration:
            batches = iter(loader)  # the next epoch (every rank's has the same length)
            continue
        except ShardError as err:
            images, message = None, str(err)
        if several:
            failed = torch.tensor([1 if message else 0], device=device)
            dist.all_reduce(failed)
            if failed.item():
                messages = [""] * dist.get_world_size()
                dist.all_gather_object(messages, message)
                message = next(m for m in messages if m)
        if message:
            raise ShardError(message)
        yield images


def _steps(ddp_model: torch.nn.Module, loader, model: Model, cfg: Config, sigmas: torch.Tensor, device: torch.device,
           failure: list[str]):
    """train_steps over the loader's batches (resampled: endless), ending on every rank at the same step at a
    non-finite loss or a shard that fails its sha256, whose message goes into ``failure`` (a retry would only repeat it)."""
    amp = cfg.train.amp and device.type == "cuda"

    def transform(x: torch.Tensor) -> torch.Tensor:
        x = to_unit_interval(x, dequantize=cfg.data.dequantize)
        return random_hflip(x) if cfg.data.random_flip else x

    try:
        yield from train_steps(ddp_model, agreed_batches(loader, device), sigmas, model.optimizer, num_steps=cfg.train.steps, start_step=model.start,
                               ema=model.ema, grad_clip=cfg.optim.grad_clip, transform=transform, amp=amp,
                               scaler=torch.amp.GradScaler("cuda") if amp else None, objective=cfg.train.objective,
                               continuous_sigma=cfg.train.sigma_sampling == "continuous")
    except (NonFiniteLossError, ShardError) as err:
        failure.append(str(err))


def _report(metrics: dict, spec: WorkerSpec, model: Model, step: int, with_checkpoint: bool, validate: bool) -> None:
    """Every rank's ray.train.report (in lockstep), with rank 0's checkpoint at checkpoint steps, uploaded to storage in
    the background while training goes on (cluster.checkpoint_upload; Ray deletes the local copy once it is uploaded); with
    ``validate`` the checkpoint is queued for its validation task, and with ``spec.validated_by`` ranks last until that
    scores it."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    cfg, tmp = spec.config, tempfile.mkdtemp(prefix="ncsn-checkpoint-")
    save_checkpoint(Path(tmp) / CHECKPOINT_FILE, Checkpoint(cfg.model, spec.schedule, model.net.state_dict(), model.ema.state_dict(),
                                                            model.optimizer.state_dict(), step, spec.run))
    if spec.validated_by:
        metrics = {**metrics, spec.validated_by: float("nan")}  # not scored yet: NaN ranks below every score
    mode = ray.train.CheckpointUploadMode.ASYNC if cfg.cluster.checkpoint_upload == "async" else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True, validation=validate)

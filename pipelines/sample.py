"""Sampling on a pool of Ray actors, with any of ncsn.sampling's samplers. N samples are cut into fixed chunks; chunk k draws its noise
from a seed derived from (seed, k) alone, so the images do not depend on how many actors there are. The checkpoint
reaches the actors through Ray's object store and their chunks come back the same way (no node needs another's
disk); the driver writes each chunk atomically (its PNGs, then its .npz last, which marks it complete), so a re-run
redoes only missing chunks."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from tqdm import tqdm

from data_prep.storage import absolute_location, is_url, local_path, open_binary
from ncsn._checks import first_line, noise_schedule, positive, positive_int
from ncsn.atomic import atomic_write
from ncsn.checkpoint import Checkpoint, load_checkpoint
from ncsn.data import from_stored, to_stored
from ncsn.images import save_image_grid, save_trajectory_strip
from ncsn.models import ScoreNetwork
from ncsn.sampling import chain_steps, derived_seed, inpaint, nfe, sample_images
from ncsn.sigmas import Sampler, Schedule
from pipelines.cluster import connect_ray
from pipelines.tracking import bound_http_requests

log = logging.getLogger(__name__)
UNREACHABLE_S = 300.0  # how long a chunk's actor may stay unreachable (its node lost and not yet back) before sampling stops
SETTINGS_FILE = "sampling.json"


class SamplingError(ValueError):
    """Bad sampling input (checkpoint, options or output directory), with a message that names it."""


@dataclass
class SamplingOptions:
    """What a sample set depends on; stored in <output>/sampling.json so a re-run can only complete the same set."""

    num_samples: int
    seed: int = 0
    chunk_size: int = 100
    steps_per_level: int | None = None  # default: the checkpoint's training config
    eps: float | None = None  # default: the checkpoint's training config
    sigmas: list[float] | None = None  # a sub-schedule to sample with (ncsnv2 models take any σ)
    denoise: bool = True
    trajectory_samples: int = 0  # with > 0, chunk 0 also records the trajectory of this many samples
    sampler: str | None = None  # default: the checkpoint's sampler; another one starts from its own defaults …
    sampler_steps: int | None = None  # … and these replace single settings of it
    corrector_steps: int | None = None
    snr: float | None = None
    rho: float | None = None
    churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None  # inf: no upper bound
    s_noise: float | None = None

    def sampler_spec(self, default: Sampler) -> Sampler:
        """The sampler these options name: ``default`` (the checkpoint's) or another one's defaults, with each setting
        given here replacing its own."""
        base = default if self.sampler in (None, default.name) else Sampler(self.sampler)
        given = {k: getattr(self, k) for k in ("corrector_steps", "snr", "rho", "churn", "s_tmin", "s_tmax", "s_noise") if getattr(self, k) is not None}
        if given.get("s_tmax") == math.inf:
            given["s_tmax"] = None
        if self.sampler_steps is not None:
            given["steps"] = self.sampler_steps
        return replace(base, **given)


@dataclass(frozen=True)
class SamplerSettings:
    """A sample set's settings, resolved once on the driver: the sampler (a ``Schedule``: σ levels, the sampler and its
    settings, ε, T, denoising) with the checkpoint's defaults filled in, its network evaluations per image, the set's
    size and seed, and the checkpoint it came from (its location, step and MLflow run). <output>/sampling.json holds
    them, flat."""

    num_samples: int
    seed: int
    chunk_size: int
    schedule: Schedule
    trajectory_samples: int
    checkpoint: str
    checkpoint_step: int
    tracking_uri: str | None
    mlflow_run_id: str | None
    nfe_per_image: int

    def record(self) -> dict:
        """As written to sampling.json."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}
        return {**record, "steps_per_level": self.schedule.steps_per_level, "eps": self.schedule.eps,
                "sigmas": list(self.schedule.sigmas), "denoise": self.schedule.denoise, "sampler": asdict(self.schedule.sampler)}

    @classmethod
    def from_record(cls, record: dict) -> SamplerSettings:
        """The inverse of ``record``."""
        record = _with_sampler(record)
        schedule = {k: record.pop(k) for k in ("sigmas", "eps", "steps_per_level", "denoise")}
        sampler = Sampler(**record.pop("sampler"))
        return cls(**record, schedule=Schedule(**schedule, sampler=sampler))


def _with_sampler(record: dict) -> dict:
    """A sampling.json from before the samplers came (no "sampler" key) as it reads now: its set was drawn by annealed
    Langevin at L·T (+1 denoising) network evaluations per image."""
    if "sampler" in record:
        return dict(record)
    return {**record, "sampler": asdict(Sampler()),
            "nfe_per_image": len(record["sigmas"]) * record["steps_per_level"] + int(record["denoise"])}


def read_settings(output: str | Path) -> SamplerSettings | None:
    """The settings of the sample set in ``output`` (its sampling.json), or None for a folder without one."""
    path = Path(output) / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        return SamplerSettings.from_record(record)
    except (ValueError, TypeError, KeyError) as err:
        raise SamplingError(f"{path}: not the settings file `ncsn-pipeline sample` writes ({type(err).__name__}: {err})") from None


def resolve_options(ckpt: Checkpoint, options: SamplingOptions, checkpoint: str = "") -> SamplerSettings:
    """The options with the checkpoint's defaults filled in where not given (given values are never replaced), checked;
    ``checkpoint``: where the checkpoint was read from."""
    steps = options.steps_per_level if options.steps_per_level is not None else ckpt.schedule.steps_per_level
    eps = options.eps if options.eps is not None else ckpt.schedule.eps
    if steps is None or eps is None:
        raise SamplingError("the checkpoint does not record the sampler settings; pass --steps-per-level and --eps")
    try:
        positive_int("--steps-per-level", steps)
        positive("--eps", eps)
    except ValueError as err:
        raise SamplingError(str(err)) from None
    sigmas = [float(x) for x in options.sigmas] if options.sigmas is not None else list(ckpt.schedule.sigmas)
    try:
        noise_schedule(torch.tensor(sigmas, dtype=torch.float64), "--sigmas")
    except ValueError as err:
        raise SamplingError(str(err)) from None
    if options.sigmas and ckpt.model_config.arch == "ncsn" and not set(np.round(options.sigmas, 8)) <= set(np.round(ckpt.schedule.sigmas, 8)):
        raise SamplingError("--sigmas: a conditional (arch ncsn) model only takes σ levels it was trained on; use a subset of them")
    if options.num_samples < 1 or options.chunk_size < 1:
        raise SamplingError(f"num_samples and chunk_size must be >= 1, got {options.num_samples} and {options.chunk_size}")
    if not 0 <= options.trajectory_samples <= options.chunk_size:
        raise SamplingError(f"trajectory_samples must be in [0, chunk_size = {options.chunk_size}], got {options.trajectory_samples}")
    levels_only = ckpt.model_config.levels_only
    try:
        schedule = Schedule(sigmas, float(eps), int(steps), options.denoise, options.sampler_spec(ckpt.schedule.sampler))
        per_image = nfe(schedule, levels_only)
    except ValueError as err:
        raise SamplingError(f"--sampler: {first_line(err)}") from None
    return SamplerSettings(options.num_samples, options.seed, options.chunk_size, schedule, options.trajectory_samples, checkpoint,
                           ckpt.step, ckpt.run.tracking_uri if ckpt.run else None, ckpt.run.run_id if ckpt.run else None, per_image)


def plan_chunks(num_samples: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, first sample index, count) covering 0 … num_samples − 1."""
    return [(k, start, min(chunk_size, num_samples - start)) for k, start in enumerate(range(0, num_samples, chunk_size))]


def chunk_complete(output: Path, chunk: int, count: int) -> bool:
    path = output / "chunks" / f"chunk_{chunk:05d}.npz"
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            return data["images"].shape[0] == count
    except Exception:  # noqa: BLE001 — a damaged chunk is redone
        return False


def write_chunk(output: Path, chunk: int, start: int, images: np.ndarray) -> None:
    """PNGs (one per sample, named by global index) then the chunk's .npz; each file appears whole or not at all."""
    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "chunks").mkdir(exist_ok=True)
    for i, image in enumerate(images):
        atomic_write(output / "images" / f"{start + i:06d}.png", lambda p: Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(p, format="PNG"))
    def npz(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary's name
            np.savez(f, images=images, indices=np.arange(start, start + len(images)))

    atomic_write(output / "chunks" / f"chunk_{chunk:05d}.npz", npz)


def load_model(checkpoint: str | Path | bytes, device: torch.device | str = "cpu") -> tuple[ScoreNetwork, Checkpoint]:
    """The EMA weights of a training checkpoint (a file or its bytes; the raw weights if it has no EMA), in eval mode."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    return ckpt.build_model().to(device).eval().requires_grad_(False), ckpt


MLFLOW_MODEL_URIS = ("runs:/", "models:/")


def checkpoint_location(reference: str | Path) -> str:
    """Where the checkpoint a user names lies: an MLflow model URI as it is, a run directory's model/checkpoint.pt, a
    checkpoint file or URL as an absolute location."""
    reference = str(reference)
    if reference.startswith(MLFLOW_MODEL_URIS):
        return reference
    location = absolute_location(reference)
    if not is_url(location) and Path(location).is_dir():
        candidates = [Path(location, "model", "checkpoint.pt"), Path(location, "checkpoint.pt")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SamplingError(f"{reference} is a directory without {candidates[0].relative_to(location)} or "
                                f"{candidates[1].name}: is it a training run directory?")
        return str(found)
    return location


def _mlflow_checkpoint_bytes(uri: str) -> bytes:
    """The checkpoint inside an MLflow model that training logged (its pyfunc's ``checkpoint`` artifact), downloaded into a
    private temporary directory, from the server $MLFLOW_TRACKING_URI names (without it MLflow would create ./mlflow.db
    and look there)."""
    import mlflow.artifacts  # only for runs:/ and models:/ checkpoints

    server = os.environ.get("MLFLOW_TRACKING_URI")
    if not server:
        raise SamplingError(f"{uri}: set MLFLOW_TRACKING_URI to the tracking server or store that holds this model (e.g. "
                            "sqlite:////abs/path/runs/digits/mlflow.db, as the training command printed)")
    bound_http_requests()
    with tempfile.TemporaryDirectory(prefix="ncsn-model-") as tmp:
        try:
            model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as err:  # noqa: BLE001 — MlflowException, requests' errors: one line naming the server
            bounds = (f" after {os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES']} retries of at most "
                      f"{os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT']} s" if server.startswith(("http://", "https://")) else "")
            raise SamplingError(f"{uri}: {server} (MLFLOW_TRACKING_URI) did not give the model{bounds}: {first_line(err, 200)}") from None
        found = sorted(model_dir.rglob("checkpoint.pt"))
        if not found:
            raise SamplingError(f"{uri} holds no checkpoint.pt: is it a model logged by ncsn-pipeline training?")
        return found[0].read_bytes()


def read_checkpoint(checkpoint: str | Path) -> tuple[Checkpoint, bytes]:
    """The checkpoint at ``checkpoint`` (see checkpoint_location) and its bytes, if its weights fit its model and are
    finite; else a SamplingError naming it and what is wrong (checked on the driver, before any actor starts).
    Actors get the bytes through Ray's object store, so no node needs the driver's disk."""
    try:
        location = checkpoint_location(checkpoint)
        if location.startswith(MLFLOW_MODEL_URIS):
            payload = _mlflow_checkpoint_bytes(location)
        else:
            with open_binary(location) as f:
                payload = f.read()
        ckpt = load_checkpoint(payload, name=str(checkpoint))
        model = ckpt.build_model()
    except SamplingError:
        raise
    except Exception as err:  # noqa: BLE001 — CheckpointError, StorageError or MLflow's error: name the checkpoint
        raise SamplingError(f"{checkpoint}: {first_line(err)}") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SamplingError(f"{checkpoint}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}); the model diverged before this checkpoint")
    return ckpt, payload


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint read and checked once, on the driver: where it is, its contents, and its bytes (what actors and tasks
    get through Ray's object store)."""

    location: str
    checkpoint: Checkpoint
    payload: bytes


def open_checkpoint(reference: str | Path | CheckpointFile) -> CheckpointFile:
    """The checkpoint a user names (see checkpoint_location), read and checked once; one already open as it is."""
    if isinstance(reference, CheckpointFile):
        return reference
    location = checkpoint_location(reference)
    return CheckpointFile(location, *read_checkpoint(location))


@dataclass(frozen=True)
class Chunk:
    """What an actor returns for one chunk; the driver writes it."""

    index: int
    start: int
    images: np.ndarray  # uint8 (N, H, W, C)
    trajectory: list[torch.Tensor] | None
    seconds: float


@dataclass(frozen=True)
class Weights:
    """A checkpoint for SamplingActor: its bytes in Ray's object store (a reference Ray hands on unresolved inside this
    wrapper, so an actor fetches it once), or a file path or bytes at hand (without Ray)."""

    source: ray.ObjectRef | str | bytes

    def read(self) -> str | bytes:
        return ray.get(self.source) if isinstance(self.source, ray.ObjectRef) else self.source


class SamplingActor:
    """Samples chunks and inpaints with the weights each call names, loaded on first use and kept. Used as a Ray actor (one
    per worker) or directly. The weights come with every call, not the constructor: Ray cannot restart an actor whose
    constructor arguments are in its object store once they are gone (ray-project/ray#53727, which Ray warns of), while a
    restarted actor of this kind just loads them again."""

    def __init__(self, use_gpu: bool = False):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._loaded: tuple[Weights, ScoreNetwork] | None = None

    def model(self, weights: Weights) -> ScoreNetwork:
        if self._loaded is None or self._loaded[0] != weights:
            self._loaded = (weights, load_model(weights.read(), self.device)[0])
        return self._loaded[1]

    def sample_chunk(self, weights: Weights, settings: SamplerSettings, chunk: int, start: int, count: int) -> Chunk:
        """Sample chunk ``chunk`` (its noise seeded by (seed, chunk) alone: the same images whatever the number of workers)."""
        t = time.perf_counter()
        model = self.model(weights)
        cfg = model.config
        gen = torch.Generator(device=self.device).manual_seed(derived_seed(settings.seed, chunk))
        schedule = settings.schedule
        trajectory_every = None
        if chunk == 0 and settings.trajectory_samples:
            trajectory_every = max(1, chain_steps(schedule, model.levels_only) // 10)
        result = sample_images(model, (count, cfg.channels, cfg.image_size, cfg.image_size), schedule,
                               trajectory_every=trajectory_every, generator=gen, device=self.device, levels_only=model.levels_only)
        if not torch.isfinite(result.samples).all():
            raise SamplingError(f"chunk {chunk}: the sampler produced NaN or inf (ε {schedule.eps:.3g} may be too large for this "
                                "model); nothing was written")
        trajectory = [t[: settings.trajectory_samples].clamp(0, 1).cpu() for t in result.trajectory] if trajectory_every else None
        return Chunk(chunk, start, to_stored(result.samples), trajectory, time.perf_counter() - t)

    def inpaint(self, weights: Weights, images: torch.Tensor, mask: torch.Tensor, settings: SamplerSettings,
                seed: int) -> torch.Tensor:
        """Complete the pixels where ``mask`` is 0 (NCSN Figure 6); images in [0, 1]."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        schedule = settings.schedule
        return inpaint(self.model(weights), images.to(self.device), mask.to(self.device), schedule.tensor().to(self.device),
                       schedule.eps, schedule.steps_per_level, generator=gen).clamp(0, 1).cpu()


@dataclass
class SampleSummary:
    output: Path
    num_samples: int
    chunks_done: int
    chunks_skipped: int
    seconds: float
    samples_per_s: float  # over the chunks sampled in this run
    nfe_per_s: float  # samples × network evaluations per image, per second: comparable across samplers
    settings: SamplerSettings

    def line(self) -> str:
        return (f"{self.num_samples} samples of seed {self.settings.seed} in {self.output} ({self.chunks_done} chunks sampled, "
                f"{self.chunks_skipped} already complete; the same seed gives the same images: --seed for others); "
                f"{self.samples_per_s:.1f} samples/s at {self.settings.nfe_per_image} network evaluations each "
                f"({self.settings.schedule.sampler.text()}), {self.nfe_per_s:.0f} image-evaluations/s")


def run_sampling(checkpoint: str | Path | CheckpointFile, output: str | Path, options: SamplingOptions, workers: int = 2,
                 use_gpu: bool = False, progress: bool = True) -> SampleSummary:
    """Sample ``options.num_samples`` images from a checkpoint on ``workers`` Ray actors into ``output``."""
    output = local_path(output, "--output").resolve()
    source = open_checkpoint(checkpoint)
    settings = resolve_options(source.checkpoint, options, source.location)
    _claim_output(output, settings)
    chunks = plan_chunks(options.num_samples, options.chunk_size)
    pending = [c for c in chunks if not chunk_complete(output, c[0], c[2])]
    t0 = time.perf_counter()
    if pending:
        connect_ray()
        actor_cls = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0, max_restarts=2, max_task_retries=2)(SamplingActor)
        weights = Weights(ray.put(source.payload))
        actors = [actor_cls.remote(use_gpu) for _ in range(min(workers, len(pending)))]
        bar = _progress(len(pending), progress)
        try:
            for done in _sample_chunks(actors, weights, settings, pending):
                if done.trajectory is not None:
                    save_trajectory_strip(done.trajectory, output / "trajectory.png", num_samples=settings.trajectory_samples)
                write_chunk(output, done.index, done.start, done.images)
                bar.update(1)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, SamplingError):  # deterministic: one line, no retry
                raise SamplingError(str(err.cause)) from None
            raise
        finally:
            bar.close()
            for actor in actors:  # also when a write failed mid-way: their CPUs go back at once, not when Ray collects them
                ray.kill(actor)
    seconds = time.perf_counter() - t0
    sampled = sum(c[2] for c in pending)
    summary = SampleSummary(output, options.num_samples, len(pending), len(chunks) - len(pending), seconds,
                            sampled / seconds if sampled else 0.0, sampled * settings.nfe_per_image / seconds if sampled else 0.0,
                            settings)
    save_image_grid(from_stored(load_samples(output, min(100, options.num_samples))), output / "grid.png", nrow=10)
    return summary


def _sample_chunks(actors: list, weights: Weights, settings: SamplerSettings, pending: list[tuple[int, int, int]]) -> Iterator[Chunk]:
    """Each pending chunk sampled once on whichever actor is free, yielded as it completes. A chunk whose actor became
    unreachable (its node lost: Ray says ActorUnavailableError until it restarts the actor, which max_task_retries does
    not cover) is submitted again; a chunk depends on (seed, chunk) alone and only this driver writes it, so none is
    written twice. A SamplingError line once an actor stayed unreachable UNREACHABLE_S seconds."""
    queue, running, idle = deque(pending), {}, list(actors)
    unreachable_since: float | None = None
    while queue or running:
        while idle and queue:
            actor, chunk = idle.pop(), queue.popleft()
            running[actor.sample_chunk.remote(weights, settings, *chunk)] = (actor, chunk)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, chunk = running.pop(ref)
        idle.append(actor)
        try:
            done = ray.get(ref)
        except ray.exceptions.ActorUnavailableError as err:
            if unreachable_since is None:
                unreachable_since = time.monotonic()
                log.warning("chunk %d: its sampling actor is unreachable (a node lost?); submitting it again until Ray "
                            "restarts the actor", chunk[0])
            elif time.monotonic() - unreachable_since > UNREACHABLE_S:
                raise SamplingError(f"chunk {chunk[0]}: its sampling actor stayed unreachable for {UNREACHABLE_S:.0f} s "
                                    f"({first_line(err, 200)})") from None
            queue.appendleft(chunk)
            time.sleep(1.0)
            continue
        unreachable_since = None
        yield done


def _progress(total: int, enabled: bool, desc: str = "sampling chunks", unit: str = "chunk"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def _claim_output(output: Path, settings: SamplerSettings) -> None:
    """Create the output directory, or check that the samples already in it were made with the same settings."""
    path, settings = output / SETTINGS_FILE, settings.record()
    for stale in _own_temporaries(output):
        stale.unlink(missing_ok=True)  # a write that a killed process (or a full disk) left half done
    if path.exists():  # compared as read back, so a setting the file predates counts as its default
        before = read_settings(output).record()
        diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if diff:
            raise SamplingError(f"{output} holds samples made with other settings ({', '.join(f'{k}: {before.get(k)!r} → {settings.get(k)!r}' for k in diff[:3])}); "
                                "use a new --output or the same settings")
        return
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(settings, indent=1)))


def _own_temporaries(output: Path) -> list[Path]:
    """The temporaries atomic_write leaves of this sample set's own files (settings, grid, trajectory, PNGs, chunks):
    any other file, a user's own ``.notes.tmp`` among them, is not this command's to delete."""
    own = re.compile(r"\.(sampling\.json|grid\.png|trajectory\.png|\d{6}\.png|chunk_\d{5}\.npz)\.[^/]+\.tmp")
    return [p for p in [*output.glob(".*.tmp"), *output.glob("images/.*.tmp"), *output.glob("chunks/.*.tmp")] if own.fullmatch(p.name)]


def load_samples(output: str | Path, limit: int | None = None) -> np.ndarray:
    """The samples of a sample directory as uint8 (N, H, W, C), in index order, from the chunk files."""
    files = sorted(Path(output, "chunks").glob("chunk_*.npz"))
    if not files:
        raise SamplingError(f"{output} has no sample chunks (expected {output}/chunks/chunk_*.npz from `ncsn-pipeline sample`)")
    parts, n = [], 0
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as data:
                images = data["images"]
        except Exception as err:  # noqa: BLE001 — BadZipFile, KeyError, ValueError, …: name the file
            raise SamplingError(f"{f}: not a readable sample chunk ({type(err).__name__}); delete it and re-run "
                                "`ncsn-pipeline sample` with the same settings to redo it") from None
        if images.dtype != np.uint8 or images.ndim != 4:
            raise SamplingError(f"{f}: expected uint8 images (N, H, W, C), got {images.dtype} of shape {images.shape}")
        parts.append(images)
        n += len(images)
        if limit is not None and n >= limit:
            break
    images = np.concatenate(parts)
    return images[:limit] if limit is not None else images


MASKS = ("centre", "half", "random")


def make_mask(kind: str, shape: tuple[int, int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """1 = known pixel, 0 = to fill: the centre square (half the side), the right half, or 50% random pixels."""
    c, h, w = shape
    mask = torch.ones(1, h, w)
    if kind == "centre":
        mask[:, h // 4: h - h // 4, w // 4: w - w // 4] = 0
    elif kind == "half":
        mask[:, :, w // 2:] = 0
    elif kind == "random":
        mask = (torch.rand(1, h, w, generator=generator) < 0.5).float()
    else:
        raise SamplingError(f"mask must be one of {', '.join(MASKS)}, got {kind!r}")
    return mask.expand(c, h, w)


def run_inpainting(checkpoint: str | Path | CheckpointFile, images: torch.Tensor, mask_kind: str, output: str | Path,
                   completions: int = 4, seed: int = 0, steps_per_level: int | None = None, eps: float | None = None,
                   use_gpu: bool = False, progress: bool = True) -> tuple[Path, SamplerSettings]:
    """Inpaint each image ``completions`` times on one Ray actor by annealed Langevin (NCSN §5); write the
    occluded | completions… | original grid.
    Returns the grid's path and the settings used (the checkpoint's MLflow run among them)."""
    output = local_path(output, "--output")
    source = open_checkpoint(checkpoint)
    settings = resolve_options(source.checkpoint, SamplingOptions(num_samples=1, seed=seed, chunk_size=1, steps_per_level=steps_per_level,
                                                                  eps=eps, sampler="als"), source.location)
    c, size = source.checkpoint.model_config.channels, source.checkpoint.model_config.image_size
    if tuple(images.shape[1:]) != (c, size, size):
        raise SamplingError(f"{source.location} models {c}×{size}×{size} images; the images to inpaint are "
                            f"{'×'.join(map(str, images.shape[1:]))} (another data set's shards?)")
    mask = make_mask(mask_kind, tuple(images.shape[1:]), torch.Generator().manual_seed(seed))
    connect_ray()
    actor = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)(SamplingActor).remote(use_gpu)
    weights = Weights(ray.put(source.payload))
    pending = {actor.inpaint.remote(weights, images, mask, settings, seed + k): k for k in range(completions)}
    filled: list[torch.Tensor | None] = [None] * completions
    with _progress(completions, progress, "inpainting", "completion") as bar:
        while pending:
            (done,), _ = ray.wait(list(pending))
            filled[pending.pop(done)] = ray.get(done)
            bar.update(1)
    occluded = images * mask + 0.5 * (1 - mask)
    rows = torch.stack([occluded, *filled, images], dim=1)  # (n, completions + 2, C, H, W)
    out = Path(output) / f"inpainting_{mask_kind}.png"
    return save_image_grid(rows.flatten(0, 1), out, nrow=completions + 2), settings

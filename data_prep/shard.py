"""The sharding job: Ray tasks write WebDataset tar shards of a Source in parallel, plus manifest.json.

Each task reads its own index range from the source (the driver's Source object, which archive sources fill as the
driver counts them, reaches the tasks through Ray's object store), writes `{__key__, png, cls}` samples to tar files
of ``shard_size`` samples (fewer when --max-shard-mb is reached first), and returns their sizes, hashes
and pixel statistics; the driver writes the manifest last, atomically. Re-running with the same
input and options finds the manifest and every shard intact and does nothing.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_prep.manifest import MANIFEST, Manifest, ShardError, load_manifest
from data_prep.sources import SPLITS, Source, open_source
from data_prep.storage import Storage, sha256_and_size
from ncsn.sigmas import bound_factors, farthest, principal_basis, scan_pairs, squared_distance

log = logging.getLogger(__name__)

FORMAT = "ncsn-pipeline/shards/3"  # raised whenever the splits or the manifest change: shards of another format are rewritten


@dataclass(frozen=True)
class ShardOptions:
    """What a sharding run writes; every field is part of the up-to-date check."""

    source: str
    input: str | None = None
    shard_size: int = 1000
    max_shard_mb: float | None = None
    crop: int | None = None
    resize: int | None = None
    channels: int = 3
    png_compress_level: int = 6

    def source_options(self) -> dict:
        if self.source != "image-folder":
            return {}
        return {"crop": self.crop, "resize": self.resize, "channels": self.channels}

    def open(self) -> Source:
        return open_source(self.source, self.input, **self.source_options())


@dataclass
class ShardSummary:
    """What a sharding run did."""

    output: str
    images: int
    shards: int
    bytes: int
    seconds: float
    up_to_date: bool
    distance_seconds: float = 0.0  # of ``seconds``: the exact max pairwise distance (σ_1), after the shards are written

    def line(self) -> str:
        if self.up_to_date:
            return f"{self.output} is up to date: {self.images} images in {self.shards} shards ({self.bytes / 1e6:.1f} MB); nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        return (f"wrote {self.images} images in {self.shards} shards ({self.bytes / 1e6:.1f} MB) to {self.output} in {self.seconds:.1f} s "
                f"({rate:.0f} images/s; the max pairwise distance over every pair of training images took {self.distance_seconds:.1f} s)")


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, C) image with C in {1, 3}."""

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_shard_range(source: Source, options: ShardOptions, split: str, start: int, stop: int, task: int,
                      output: str) -> tuple[dict, np.ndarray | None]:
    """Write records [start, stop) of ``split`` as tar shard(s) under ``output``; return their descriptions and
    statistics, and (training split only) the images as uint8 (N, H, W, C) for the exact max pairwise distance."""

    storage = Storage(output)
    max_bytes = int(options.max_shard_mb * 1e6) if options.max_shard_mb else None
    shards: list[dict] = []
    shape = None
    images: list[np.ndarray] = []
    part, writer, tmp, count = 0, None, None, 0

    def close() -> None:
        nonlocal writer, tmp, count, part
        writer.close()
        name = f"{split}/{split}-{task:05d}-{part:02d}.tar"
        with open(tmp, "rb") as f:
            digest, size = sha256_and_size(f)
        storage.put_atomic(tmp, name)
        shards.append({"path": name, "count": count, "bytes": size, "sha256": digest})
        writer, tmp, count, part = None, None, 0, part + 1

    try:
        for rec in source.read(split, start, stop):
            if shape is None:
                shape = rec.image.shape
            elif rec.image.shape != shape:
                raise ShardError(f"{rec.key}: image shape {rec.image.shape} differs from {shape}; set --resize (and --crop) to make them equal")
            if writer is None:
                fd, tmp = tempfile.mkstemp(suffix=".tar")
                writer = wds.TarWriter(os.fdopen(fd, "wb"))
            sample_dict = {"__key__": rec.key, "png": encode_png(rec.image, options.png_compress_level)}
            if rec.label is not None:
                sample_dict["cls"] = rec.label
            writer.write(sample_dict)
            count += 1
            images.append(rec.image)
            if count >= options.shard_size or (max_bytes and writer.tarstream.fileobj.tell() >= max_bytes):
                close()
        if writer is not None:
            close()
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    stack = np.stack(images) if images else None
    pix_sum, pix_sq = pixel_sums(stack) if stack is not None else (None, None)
    return {
        "shards": shards,
        "shape": list(shape) if shape is not None else None,
        "pixel_sum": pix_sum,
        "pixel_sq_sum": pix_sq,
    }, (stack if split == "train" else None)


def pixel_sums(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per channel, the sum and the sum of squares of uint8 ``images`` (N, H, W, C) in [0, 1] units, exact: from each
    channel's histogram of the 256 values."""
    values = np.arange(256, dtype=np.float64)
    counts = [np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])]
    return [float(h @ values) / 255.0 for h in counts], [float(h @ values**2) / 255.0**2 for h in counts]


def _plan_tasks(source: Source, shard_size: int, workers: int) -> list[tuple[str, int, int, int]]:
    """(split, start, stop, task) ranges: whole shards, at most 4 tasks per worker (few blocks for the max distance's
    pairs of blocks) while a lost task still costs little."""
    counts = {split: source.count(split) for split in SPLITS}
    n_shards = sum(math.ceil(n / shard_size) for n in counts.values())
    shards_per_task = max(1, math.ceil(n_shards / (4 * workers)))
    plan = []
    for split in SPLITS:
        step = shards_per_task * shard_size
        plan += [(split, lo, min(lo + step, counts[split]), i) for i, lo in enumerate(range(0, counts[split], step))]
    return plan


def _fingerprint(options: ShardOptions, source: Source) -> dict:
    fields = {k: v for k, v in options.__dict__.items() if k != "input"}
    return {"format": FORMAT, "options": fields, "input": source.fingerprint()}


def _intact(storage: Storage, manifest: Manifest) -> bool:
    """Every shard present with the bytes the manifest hashed (content, not only sizes)."""
    return all(storage.exists(s.path) and storage.sha256_and_size(s.path) == (s.sha256, s.bytes) for s in manifest.shards())


def shard_dataset(options: ShardOptions, output: str, workers: int | None = None, progress: bool = True,
                  connect: Callable[[], None] | None = None) -> ShardSummary:
    """Shard ``options.source`` into ``output`` with Ray tasks (``workers`` at once; default: the cluster's CPUs).
    ``connect`` joins or starts Ray when there is work to do (pipelines.cluster.connect_ray); without it the caller has
    connected already. Up-to-date shards need no Ray."""

    if options.shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {options.shard_size}")
    if workers is not None and workers < 1:
        raise ShardError(f"--workers must be >= 1, got {workers}")
    if options.max_shard_mb is not None and not options.max_shard_mb > 0:
        raise ShardError(f"--max-shard-mb must be > 0, got {options.max_shard_mb}")
    start_time = time.perf_counter()
    storage = Storage(output)
    source = options.open()
    fingerprint = _fingerprint(options, source)
    old = None
    if storage.exists(MANIFEST):
        try:
            old = load_manifest(output)
        except ShardError as err:  # a damaged manifest is rewritten; nothing it names is trusted or removed
            log.warning("%s; rewriting the shards", err)
    if old is not None:
        if old.fingerprint == fingerprint and _intact(storage, old):
            shards = old.shards()
            return ShardSummary(output, old.total_count, len(shards), sum(s.bytes for s in shards), 0.0, True)
        log.info("%s holds shards from other inputs or options, or damaged ones: rewriting", output)
    if connect is not None:
        connect()
    elif not ray.is_initialized():
        raise ShardError("the sharding job runs as Ray tasks: connect to Ray first (ray.init, or pass connect=)")
    workers = workers if workers is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))
    task_fn = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(write_shard_range)
    plan = _plan_tasks(source, options.shard_size, workers)
    total = sum(stop - lo for _, lo, stop, _ in plan)
    pending, results, train_blocks, queue, source_ref = {}, {}, [], list(plan), ray.put(source)
    bar = tqdm(total=total, unit="img", desc=f"shard {options.source}", disable=not progress)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                split, lo, stop, task = queue.pop(0)
                stats_ref, images_ref = task_fn.remote(source_ref, options, split, lo, stop, task, output)
                pending[stats_ref] = (split, task, stop - lo, images_ref)
                if split == "train":
                    train_blocks.append(images_ref)  # stays in the object store for the distance tasks
            done, _ = ray.wait(list(pending), num_returns=1)
            split, task, n, _ = pending[done[0]]
            try:
                results[(split, task)] = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:  # left pending: its other return holds the same error
                cause = err.cause if getattr(err, "cause", None) is not None else err
                raise ShardError(f"shard task {split}/{task} failed: {type(cause).__name__}: {cause}") from None
            del pending[done[0]]
            bar.update(n)
    finally:
        bar.close()
        _abandon([ref for stats_ref, (*_, images_ref) in pending.items() for ref in (stats_ref, images_ref)])
    distance_start = time.perf_counter()
    max_distance = _max_distance(train_blocks)
    distance_seconds = time.perf_counter() - distance_start
    manifest = _build_manifest(options, fingerprint, source, plan, results, max_distance)
    old_paths = {s.path for s in old.shards()} if old is not None else set()
    storage.write_text_atomic(MANIFEST, json.dumps(manifest, indent=2))
    new_paths = {s["path"] for sp in manifest["splits"].values() for s in sp["shards"]}
    for stale in old_paths - new_paths:
        storage.remove(stale)
    shards = [s for sp in manifest["splits"].values() for s in sp["shards"]]
    return ShardSummary(output, manifest["total_count"], len(shards), sum(s["bytes"] for s in shards), time.perf_counter() - start_time, False,
                        distance_seconds)


def _abandon(refs: list) -> None:
    """Cancel the tasks behind ``refs`` and take their outcomes, so Ray never reports their errors as unhandled when
    the references are dropped (a caller that goes on after a failed job would see a traceback per sibling task)."""
    for ref in refs:
        ray.cancel(ref, force=True)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the job failed already; these outcomes are only acknowledged
            pass


def _max_distance(blocks: list) -> float | None:
    """The exact max pairwise distance of the training images (``blocks``: the shard tasks' image arrays in the object
    store), in [0, 1] units: the bound's factors per block, a start from a few exact distances, then one task per pair
    of blocks (and per block) that computes only the pairs the bound leaves (ncsn.sigmas.scan_pairs)."""

    if not blocks:
        return None
    remote = ray.remote(num_cpus=1, max_retries=2)
    first = ray.get(blocks[0])
    mean, basis = principal_basis(_tensor(first[:: max(1, len(first) // 512)]))
    factors = [remote(_block_factors).remote(block, mean, basis) for block in blocks]
    norms = [f[0][:, -2] for f in ray.get(factors)]  # squared distances to the mean
    if sum(len(n) for n in norms) < 2:
        return 0.0
    b = max(range(len(blocks)), key=lambda k: norms[k].max().item())
    x = ray.get(blocks[b])[int(norms[b].argmax())]  # the image farthest from the mean, its farthest, and that one's farthest
    y = _farthest_image(blocks, x, remote)
    x = _farthest_image(blocks, y, remote)
    best, scale = squared_distance(_tensor(x), _tensor(y)), max(n.max().item() for n in norms)
    scans = [remote(_scan_blocks).remote(blocks[i], factors[i], blocks[j], factors[j], best, scale, i == j)
             for i in range(len(blocks)) for j in range(i, len(blocks))]
    return math.sqrt(max(ray.get(scans))) / 255.0  # on the uint8 values (exact in float32), scaled once


def _tensor(images: np.ndarray) -> torch.Tensor:
    """A tensor over an image array without a copy; arrays from Ray's object store are read-only, and nothing here writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's warning about non-writable arrays
        return torch.from_numpy(images)


def _block_factors(block: np.ndarray, mean: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bound_factors(_tensor(block), mean, basis)


def _farthest_image(blocks: list, x: np.ndarray, remote) -> np.ndarray:
    """The training image farthest from ``x``: one task per block."""

    found = ray.get([remote(_farthest_in_block).remote(block, x) for block in blocks])
    b = max(range(len(blocks)), key=lambda k: found[k][1])
    return ray.get(blocks[b])[found[b][0]]


def _farthest_in_block(block: np.ndarray, x: np.ndarray) -> tuple[int, float]:
    return farthest(_tensor(block), _tensor(x))


def _scan_blocks(a: np.ndarray, factors_a: tuple, b: np.ndarray, factors_b: tuple, best: float, scale: float, same: bool) -> float:
    return scan_pairs(_tensor(a), factors_a, _tensor(b), factors_b, best, scale, same=same)


def _build_manifest(options: ShardOptions, fingerprint: dict, source: Source, plan: list, results: dict,
                    max_distance: float | None) -> dict:
    splits: dict[str, dict] = {}
    shape = next((r["shape"] for r in results.values() if r["shape"] is not None), None)
    for split in SPLITS:
        parts = [results[(sp, task)] for sp, _, _, task in plan if sp == split]
        shards = [s for r in parts for s in r["shards"]]
        for r in parts:
            if r["shape"] is not None and r["shape"] != shape:
                raise ShardError(f"split {split} has images of shape {r['shape']}, others {shape}; set --resize to make them equal")
        entry = {"count": sum(s["count"] for s in shards), "shards": shards}
        if split == "train" and shards:
            n_pixels = entry["count"] * shape[0] * shape[1]
            mean = np.sum([r["pixel_sum"] for r in parts], axis=0) / n_pixels
            var = np.sum([r["pixel_sq_sum"] for r in parts], axis=0) / n_pixels - mean**2
            entry["statistics"] = {
                "pixel_scale": "[0, 1]",
                "channel_mean": mean.tolist(),
                "channel_std": np.sqrt(np.maximum(var, 0)).tolist(),
                "max_pairwise_distance": max_distance,
                "note": "mean/std over every training pixel; max pairwise distance: exact, over every pair of training images",
            }
        splits[split] = entry
    return {
        "format": FORMAT,
        "dataset": options.source,
        "image_shape": shape,
        "channels": shape[-1] if shape else None,
        "classes": source.classes,
        "test_split": source.split_rule,
        "validation_split": source.validation_rule,
        "total_count": sum(s["count"] for s in splits.values()),
        "splits": splits,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def verify_shards(output: str) -> list[str]:
    """Re-hash every shard against the manifest; return one line per problem (empty when all match)."""
    storage = Storage(output)
    manifest = load_manifest(output)
    problems = []
    for shard in manifest.shards():
        if not storage.exists(shard.path):
            problems.append(f"{shard.path}: missing")
            continue
        digest, size = storage.sha256_and_size(shard.path)
        if size != shard.bytes:
            problems.append(f"{shard.path}: {size} bytes, manifest says {shard.bytes}")
        elif digest != shard.sha256:
            problems.append(f"{shard.path}: sha256 {digest[:12]}…, manifest says {shard.sha256[:12]}…")
    return problems

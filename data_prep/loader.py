"""Training loader over WebDataset shards: split by rank and worker, shuffled, decoded to uint8 tensors,
with every rank drawing the same number of batches per epoch so DDP never waits on a missing batch.

Two modes:
- ``resampled=False`` (one exact pass): shards are dealt to ranks round-robin; each rank yields
  ``batches_per_epoch`` batches, the fewest any rank can fill from its shards, so no sample is seen
  twice and at most the ranks' imbalance is left out (reported as ``dropped_per_epoch``).
- ``resampled=True``: every worker draws shards at random with replacement (seeded per rank and
  worker), an endless stream cut into epochs of ``batches_per_epoch`` (default: one pass's worth).

Shards are streamed from their location (a local path or an fsspec URL: s3://, gs://, memory://), never downloaded
whole, and each is hashed as it streams: a shard whose sha256 is not the manifest's (replaced, truncated, damaged) is a
ShardError naming it once it has been read to its end, so at most that one shard's samples were drawn before training
stops. (An epoch of the exact pass can end inside a shard; that shard's tail, not drawn, is not hashed.) Undecodable
samples of a shard whose hash is right are skipped with a warning; ``skipped`` counts them. A shard missing at start,
or one that cannot be opened (refused, unreachable), is an error naming its URL.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_prep.manifest import Manifest, ShardError, load_manifest
from data_prep.storage import Storage, StorageError, open_binary

log = logging.getLogger(__name__)


@dataclass
class _Skip:
    """Marker a worker yields in place of data it had to skip."""

    reason: str


@dataclass
class _Fatal:
    """Marker a worker yields for data that must stop the loader (a shard whose sha256 is not the manifest's)."""

    reason: str


class _Hashing:
    """A binary stream that hashes what is read through it; ``finish`` reads the rest and returns the sha256."""

    def __init__(self, stream):
        self.stream, self.hash = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def _as_is(item):
    """DataLoader collate for batch_size=None that keeps numpy arrays and markers unchanged."""
    return item


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


class _ShardStream(torch.utils.data.IterableDataset):
    """Worker side: reads its shards and yields (image HWC uint8, label) or _Skip markers."""

    def __init__(self, digests: dict[str, str], resampled: bool, shuffle_buffer: int, seed: int, rank: int, shape: tuple):
        super().__init__()
        self.digests, self.urls, self.resampled, self.shuffle_buffer = digests, list(digests), resampled, shuffle_buffer
        self.seed, self.rank, self.shape = seed, rank, tuple(shape)
        self.epoch = 0

    def _worker_urls(self, rng: np.random.Generator) -> Iterator[str]:
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if self.resampled:
            while True:
                yield self.urls[rng.integers(len(self.urls))]
        else:
            yield from self.urls[wid::nworkers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid])
        errors: list[str] = []
        mismatched: list[str] = []

        def on_error(exn: Exception) -> bool:
            if isinstance(exn, StorageError):
                raise exn
            errors.append(f"{type(exn).__name__}: {exn}")
            return True  # keep going

        def opened(urls: Iterator[str]) -> Iterator[dict]:
            """Each shard streamed from its location (a missing, refused or unreachable one stops with its URL) and,
            once the expander asks for the next, hashed to its end against the manifest."""
            for url in urls:
                with open_binary(url) as stream:
                    hashing = _Hashing(stream)
                    yield {"url": url, "stream": hashing}
                    if (digest := hashing.finish()) != self.digests[url]:
                        mismatched.append(f"{url}: its sha256 is {digest[:16]}…, the manifest's {self.digests[url][:16]}… "
                                          "(the shard was changed or damaged after sharding); run `ncsn-pipeline shard --verify`")

        files = wds.tariterators.tar_file_expander(opened(self._worker_urls(rng)), handler=on_error)  # endless when resampled
        samples = wds.tariterators.group_by_keys(files, handler=on_error)
        buffer: list[tuple] = []
        for sample in samples:
            if mismatched:
                yield _Fatal(mismatched[0])
                return
            while errors:
                yield _Skip(errors.pop())
            try:
                image = _decode_png(sample["png"])
                if image.shape != self.shape:
                    raise ValueError(f"shape {image.shape}, manifest says {self.shape}")
                label = int(sample["cls"]) if "cls" in sample else -1
            except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
                yield _Skip(f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}: {type(exn).__name__}: {exn}")
                continue
            buffer.append((image, label))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.integers(len(buffer)))
        if mismatched:
            yield _Fatal(mismatched[0])
            return
        while errors:
            yield _Skip(errors.pop())
        rng.shuffle(buffer)
        yield from buffer


def check_shards_present(manifest: Manifest, split: str) -> None:
    """A ShardError naming the first missing file when a shard the manifest lists for ``split`` is not there."""
    storage = Storage(manifest.location)
    missing = [s.path for s in manifest.split(split).shards if not storage.exists(s.path)]
    if missing:
        raise ShardError(f"{len(missing)} shard file(s) listed in {manifest.location}/manifest.json are missing, e.g. "
                         f"{storage.path(missing[0])}")


class ShardLoader:
    """Iterable of (images uint8 (B, C, H, W), labels int64 (B,)) batches for one rank; see the module doc."""

    def __init__(self, manifest: Manifest, split: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, resampled: bool, batches_per_epoch: int | None, seed: int):
        self.manifest, self.batch_size = manifest, batch_size
        self.skipped = 0
        self.epoch = 0
        shards = manifest.split(split).shards
        storage = Storage(manifest.location)
        check_shards_present(manifest, split)
        if resampled:
            mine = shards
            pass_batches = manifest.split(split).count // (world_size * batch_size)
            self.batches_per_epoch = batches_per_epoch or pass_batches
            self.dropped_per_epoch = 0
        else:
            if len(shards) < world_size:
                raise ShardError(
                    f"{len(shards)} {split} shard(s) cannot feed {world_size} ranks in one exact pass: "
                    f"re-shard with a smaller --shard-size (at least {world_size} shards) or use resampled=True"
                )
            per_rank = [sum(s.count for s in shards[r::world_size]) for r in range(world_size)]
            fillable = min(per_rank) // batch_size
            self.batches_per_epoch = min(batches_per_epoch, fillable) if batches_per_epoch else fillable
            self.dropped_per_epoch = sum(per_rank) - self.batches_per_epoch * batch_size * world_size
            mine = shards[rank::world_size]
        if self.batches_per_epoch < 1:
            raise ShardError(f"batch_size {batch_size} is larger than what each of the {world_size} rank(s) holds of split {split}")
        self.num_workers = min(num_workers, len(mine)) if not resampled else num_workers
        self.stream = _ShardStream({storage.path(s.path): s.sha256 for s in mine}, resampled, shuffle_buffer, seed, rank, manifest.image_shape)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.epoch = self.epoch
        self.epoch += 1
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                                             persistent_workers=False, prefetch_factor=64 if self.num_workers else None)
        images, labels, made = [], [], 0
        for item in loader:
            if isinstance(item, _Fatal):
                raise ShardError(item.reason)
            if made == self.batches_per_epoch:  # one pass reads on (what the epoch drops), so every shard is hashed to its end
                continue
            if isinstance(item, _Skip):
                self.skipped += 1
                log.warning("skipped unreadable data: %s", item.reason)
                continue
            images.append(item[0])
            labels.append(item[1])
            if len(images) == self.batch_size:
                yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)
                images, labels, made = [], [], made + 1
                if made == self.batches_per_epoch and self.stream.resampled:  # an endless stream: the epoch ends here
                    return
        if made < self.batches_per_epoch:
            raise ShardError(
                f"the shards ran out after {made} of {self.batches_per_epoch} batches ({self.skipped} samples skipped as unreadable): "
                "too many corrupt samples for an equal-length epoch; run `ncsn-pipeline shard --verify`"
            )


def make_loader(
    shards: Manifest | str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    split: str = "train",
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    batches_per_epoch: int | None = None,
    seed: int = 0,
) -> ShardLoader:
    """A loader over the ``split`` shards of ``shards``: a Manifest already read (a training worker's, from its spec), or a
    directory/URL holding manifest.json (or the manifest's path), read here."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(shards, str):
        shards = load_manifest(shards[: -len("/manifest.json")] if shards.endswith("/manifest.json") else shards)
    shards.split(split)
    return ShardLoader(shards, split, batch_size, rank, world_size, num_workers, shuffle_buffer, resampled, batches_per_epoch, seed)

"""A shard set's manifest.json as a frozen, typed value, read and checked once (load_manifest) and then passed on: the
image shape and classes, each split's shards with their counts, sizes and sha256, the training statistics, the split
rules and the set's digest (the key of every cache computed from it)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from data_prep.storage import Storage

MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """The sharding job failed, or a shard set cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard: its path inside the shard set, its sample count, byte size and sha256."""

    path: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Statistics:
    """Exact statistics of the training split in [0, 1] pixel units: per-channel mean and sd over every pixel, and the
    largest distance between two training images (NCSNv2 technique 1's σ_1)."""

    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    max_pairwise_distance: float | None


@dataclass(frozen=True)
class Split:
    """A split's shards, its image count, and (training split only) its statistics."""

    count: int
    shards: tuple[ShardEntry, ...]
    statistics: Statistics | None = None


@dataclass(frozen=True)
class Manifest:
    """A shard set: where it is, what it holds (shape H × W × C, classes), its splits and their rules, its digest."""

    location: str
    dataset: str
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...] | None
    splits: dict[str, Split]
    test_split: str
    validation_split: str | None
    fingerprint: dict
    digest: str  # 16 hex digits of sha256 over the splits as written: the set's identity

    @property
    def channels(self) -> int:
        return self.image_shape[-1]

    @property
    def total_count(self) -> int:
        return sum(split.count for split in self.splits.values())

    def shards(self) -> list[ShardEntry]:
        """Every shard of every split."""
        return [s for split in self.splits.values() for s in split.shards]

    def split(self, name: str) -> Split:
        """The split ``name``; a ShardError naming the splits there are when it is missing."""
        if name not in self.splits:
            raise ShardError(f"{self.location}/{MANIFEST} has no split {name!r} (it has {', '.join(self.splits)}; a shard set "
                             "written before validation splits existed has none: re-run `ncsn-pipeline shard`)")
        return self.splits[name]


def load_manifest(output: str) -> Manifest:
    """The manifest of a shard directory or URL, checked: every shard entry names a file inside ``output`` and has
    integer counts and sizes and a sha256; a clear error naming the entry otherwise, or when it is missing or unreadable."""
    storage = Storage(output)
    where = f"{output.rstrip('/')}/{MANIFEST}"
    try:
        raw = json.loads(storage.read_text(MANIFEST))
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST} in {output}: run `ncsn-pipeline shard` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where} is not valid JSON: {err}") from None
    splits = raw.get("splits") if isinstance(raw, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(v, dict) and isinstance(v.get("shards"), list) for v in splits.values()):
        raise ShardError(f"{where} has no splits with shard lists; re-run `ncsn-pipeline shard`")
    shape = raw.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ShardError(f"{where}: image_shape must be [H, W, C] of positive integers, got {shape!r}; re-run `ncsn-pipeline shard`")
    return Manifest(output, str(raw.get("dataset") or "shards"), tuple(shape), tuple(raw["classes"]) if raw.get("classes") else None,
                    {name: _split(name, entry, where) for name, entry in splits.items()}, str(raw.get("test_split", "")),
                    raw.get("validation_split"), raw.get("fingerprint") or {},
                    hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16])


def _split(name: str, entry: dict, where: str) -> Split:
    shards = []
    for shard in entry["shards"]:
        if not isinstance(shard, dict):
            raise ShardError(f"{where}: split {name} lists {shard!r}, not a shard entry")
        try:
            Storage.check_relative(shard.get("path"))
        except ValueError as err:
            raise ShardError(f"{where}: split {name}: shard path {err}; refusing to read or remove it") from None
        if not all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("count", "bytes")) or not isinstance(shard.get("sha256"), str):
            raise ShardError(f"{where}: shard {shard['path']} needs integer count and bytes and a sha256")
        shards.append(ShardEntry(shard["path"], shard["count"], shard["bytes"], shard["sha256"]))
    stats = entry.get("statistics")
    statistics = (Statistics(tuple(stats["channel_mean"]), tuple(stats["channel_std"]), stats.get("max_pairwise_distance"))
                  if isinstance(stats, dict) else None)
    return Split(sum(s.count for s in shards), tuple(shards), statistics)

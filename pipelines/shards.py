"""The shards a run uses: given, or the configured source sharded under the run directory first."""
from __future__ import annotations

import logging
from pathlib import Path

from data_prep.shard import ShardOptions, shard_dataset
from pipelines.cluster import connect_ray
from pipelines.config import Config

log = logging.getLogger(__name__)


def local_shards(cfg: Config) -> Path:
    """Where shards_for writes the configured source when no shard location is given."""
    return Path(cfg.run_dir).resolve() / "shards" / cfg.data.source


def shards_for(cfg: Config, shards: str | None = None, progress: bool = True) -> str:
    """The shards a run uses: ``shards``, else data.shards, else the configured source sharded into
    <run_dir>/shards/<source> (a no-op when those are up to date)."""
    if shards or cfg.data.shards:
        return shards or cfg.data.shards
    out = str(local_shards(cfg))
    options = ShardOptions(cfg.data.source, cfg.data.input, shard_size=cfg.data.shard_size, crop=cfg.data.crop,
                           resize=cfg.data.resize, channels=cfg.model.channels)
    log.info(shard_dataset(options, out, progress=progress, connect=connect_ray).line())
    return out

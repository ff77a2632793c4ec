"""The process's one connection to Ray, made on first need by whichever stage runs first (sharding, training,
tuning, sampling, inpainting) and then shared by the rest. The sharding job (data_prep) is handed it as a callable."""
from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)


def connect_ray() -> None:
    """Join the Ray cluster RAY_ADDRESS names (or the head `ray start` runs on this machine), else start a local
    instance; nothing when this process is connected. Worker logs reach this console (rank 0's progress lines)."""

    if ray.is_initialized():
        return
    ray.init()
    log.info("connected to Ray: %d CPUs, %d GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))

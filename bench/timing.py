"""Side-by-side timing for the benchmarks: the variants interleaved within each repeat (a noisy machine moves them
alike), each the best of the repeats; CUDA work is synchronised before the clock is read."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_best(variants: dict[str, Callable[[], object]], calls: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of each variant: ``calls`` calls in a row per variant and repeat, best over ``repeats``."""
    best = {key: float("inf") for key in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            best[key] = min(best[key], (time.perf_counter() - t) / calls)
    return best

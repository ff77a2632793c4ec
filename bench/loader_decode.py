"""Decode rate of the shard loader (data_prep.loader.make_loader): images/s with 1 and 2 DataLoader worker processes for
32×32×3 and 64×64×3 shards (smooth synthetic images, which PNG compresses like photographs), each the best of
--repeats, the sizes interleaved. With a GPU's measured training rate R (img/s, bench/gpu_step.py), one GPU needs
ceil(R / per-worker rate) loader workers.

Usage: python bench/loader_decode.py [--images 6000] [--repeats 3] [--batch 128]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import ray
import torch
from PIL import Image

from data_prep.loader import make_loader
from data_prep.shard import ShardOptions, shard_dataset
from pipelines.cluster import connect_ray
from tests.datasets import smooth_images


def write_smooth_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """n RGB PNGs of tests.datasets.smooth_images, in one folder."""
    root.mkdir(parents=True)
    for i, image in enumerate(smooth_images(np.random.default_rng(seed), n, size)):
        Image.fromarray(image).save(root / f"{i:06d}.png")


def rate(shards: str, batch: int, workers: int, batches: int) -> float:
    loader = make_loader(shards, batch, num_workers=workers, resampled=True, batches_per_epoch=batches, shuffle_buffer=256)
    it = iter(loader)
    next(it)  # worker start-up is not decoding
    t = time.perf_counter()
    n = sum(images.shape[0] for images, _ in it)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        shards = {}
        for size in (32, 64):
            write_smooth_images(Path(tmp) / f"images{size}", args.images, size)
            out = str(Path(tmp) / f"shards{size}")
            shard_dataset(ShardOptions("image-folder", str(Path(tmp) / f"images{size}"), shard_size=500), out, progress=False, connect=connect_ray)
            shards[size] = out
        ray.shutdown()
        best = {(size, w): 0.0 for size in shards for w in (1, 2)}
        for _ in range(args.repeats):
            for (size, workers) in best:
                best[(size, workers)] = max(best[(size, workers)], rate(shards[size], args.batch, workers, args.batches))
    print(f"loader decode rate, batch {args.batch}, {args.batches} batches per measurement, best of {args.repeats}")
    for (size, workers), value in best.items():
        print(f"{size}x{size}x3  {workers} worker(s): {value:8.0f} img/s  ({value / workers:8.0f} per worker)")


if __name__ == "__main__":
    main()

"""Images/s of the Ray sharding job vs one plain process writing the same shards with webdataset.ShardWriter, on
CIFAR-10-format images (a cifar-10-python.tar.gz this script writes: 50 000 training and 10 000 test images by
default), the two sides interleaved, best of --repeats. Two figures for the job: all it does (shards, sha256 per
shard, pixel statistics, the exact max pairwise distance σ_max over every pair of training images, the manifest), and
the same without the σ_max phase (its own timing), which the plain loop has no counterpart for.

Usage: python bench/shard_throughput.py [--images 60000] [--workers 2] [--repeats 3] [--pixels smooth|random]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import webdataset as wds

from data_prep.manifest import load_manifest
from data_prep.shard import ShardOptions, encode_png, shard_dataset
from pipelines.cluster import connect_ray
from data_prep.sources import SPLITS, Cifar10Source
from tests.datasets import write_cifar10_tarball


def plain(tarball: Path, out: Path, shard_size: int) -> float:
    """Images/s of one process: read the tarball, PNG-encode, write tar shards."""
    source = Cifar10Source(tarball)
    t = time.perf_counter()
    n = 0
    out.mkdir()
    for split in SPLITS:
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for rec in source.read(split, 0, source.count(split)):
                sink.write({"__key__": rec.key, "png": encode_png(rec.image), "cls": rec.label})
                n += 1
    return n / (time.perf_counter() - t)


def job(tarball: Path, out: Path, shard_size: int, workers: int) -> tuple[float, float]:
    """Images/s of the sharding job from its start to the manifest written: all of it, and less its σ_max phase."""
    t = time.perf_counter()
    summary = shard_dataset(ShardOptions("cifar10", str(tarball), shard_size=shard_size), str(out), workers=workers, progress=False, connect=connect_ray)
    seconds = time.perf_counter() - t
    return summary.images / seconds, summary.images / (seconds - summary.distance_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000, help="training and test images together (5/6 training)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixels", choices=["smooth", "random"], default="smooth",
                        help="smooth: low-frequency images with grain, like photographs; random: uniform noise")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "cifar-10-python.tar.gz"
        write_cifar10_tarball(tarball, per_batch=args.images // 6, smooth=args.pixels == "smooth")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        best = {"plain": 0.0, "job": 0.0, "shards": 0.0}
        for k in range(args.repeats):
            best["plain"] = max(best["plain"], plain(tarball, Path(tmp) / f"plain{k}", args.shard_size))
            whole, shards = job(tarball, Path(tmp) / f"job{k}", args.shard_size, args.workers)
            best["job"], best["shards"] = max(best["job"], whole), max(best["shards"], shards)
        stats = load_manifest(str(Path(tmp) / "job0")).split("train").statistics
        ray.shutdown()
    print(f"{args.images // 6 * 6} CIFAR-10-format images (32x32x3, {args.pixels} pixels), shard size {args.shard_size}, "
          f"best of {args.repeats}, interleaved")
    print(f"plain ShardWriter, 1 process:             {best['plain']:8.0f} images/s")
    print(f"Ray sharding job, {args.workers} workers, all of it:  {best['job']:8.0f} images/s  (exact σ_max "
          f"{stats.max_pairwise_distance:.4f} included)   ratio to plain {best['job'] / best['plain']:.2f}")
    print(f"  … less its σ_max phase:                 {best['shards']:8.0f} images/s  (shards, sha256, pixel statistics, "
          f"manifest)   ratio to plain {best['shards'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()

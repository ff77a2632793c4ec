"""Images/s of the Ray sharding job vs a plain single-process webdataset.ShardWriter loop, on the same
20k CIFAR-10-format images (a tarball this script writes), as a ratio measured in one run.

Usage: python bench/shard_throughput.py [--images 20000] [--workers 2]
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

from data_prep.shard import ShardOptions, encode_png, shard_dataset
from data_prep.sources import Cifar10Source
from tests.datasets import write_cifar10_tarball


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "cifar-10-python.tar.gz"
        write_cifar10_tarball(tarball, per_batch=args.images // 6)
        source = Cifar10Source(tarball)
        n = source.count("train") + source.count("test")

        t = time.perf_counter()
        (Path(tmp) / "plain").mkdir()
        for split in ("train", "test"):
            with wds.ShardWriter(str(Path(tmp) / "plain" / f"{split}-%06d.tar"), maxcount=args.shard_size, verbose=0) as sink:
                for rec in source.read(split, 0, source.count(split)):
                    sink.write({"__key__": rec.key, "png": encode_png(rec.image), "cls": rec.label})
        plain = n / (time.perf_counter() - t)

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        summary = shard_dataset(ShardOptions("cifar10", str(tarball), shard_size=args.shard_size), str(Path(tmp) / "ray"),
                                workers=args.workers, progress=False)
        ours = summary.images / summary.seconds
        ray.shutdown()
    print(f"{n} CIFAR-10-format images (32x32x3, random pixels), shard size {args.shard_size}")
    print(f"plain ShardWriter, 1 process:   {plain:8.0f} images/s")
    print(f"Ray sharding job, {args.workers} workers:   {ours:8.0f} images/s  (manifest, hashes, statistics included)")
    print(f"ratio Ray / plain:              {ours / plain:8.2f}")


if __name__ == "__main__":
    main()

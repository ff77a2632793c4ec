"""Images/s of the training loader streaming shards from an S3-compatible server (moto's, on 127.0.0.1) vs from local
files, as a ratio measured in one run: the same shards, the two sides interleaved, best of several passes. The loader
hashes every shard it streams (sha256, checked against the manifest); the last line is that hashing's share of a local
pass: the time to hash the same bytes alone over the time of the pass (both best of the repeats).

Usage: python bench/loader_s3.py [--images 20000] [--repeats 3] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import S3Server, free_port  # noqa: E402

PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{PORT}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                  AWS_DEFAULT_REGION="us-east-1")

import fsspec  # noqa: E402
import ray  # noqa: E402

from data_prep.loader import make_loader  # noqa: E402
from data_prep.manifest import load_manifest  # noqa: E402
from data_prep.shard import ShardOptions, shard_dataset  # noqa: E402
from pipelines.cluster import connect_ray  # noqa: E402
from tests.datasets import write_cifar10_tarball  # noqa: E402


def hash_seconds(local: str) -> float:
    """Seconds to sha256 every training shard's bytes (from memory: the hashing alone)."""
    blobs = [Path(local, entry.path).read_bytes() for entry in load_manifest(local).split("train").shards]
    t = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    return time.perf_counter() - t


def images_per_s(location: str, workers: int) -> float:
    loader = make_loader(location, 250, num_workers=workers, shuffle_buffer=1000)
    t, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3", port=PORT).start()
        try:
            tarball = Path(tmp) / "cifar-10-python.tar.gz"
            write_cifar10_tarball(tarball, per_batch=args.images // 6)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            local = str(Path(tmp) / "shards")
            shard_dataset(ShardOptions("cifar10", str(tarball), shard_size=1000), local, progress=False, connect=connect_ray)
            ray.shutdown()
            remote = server.create_bucket("bench") + "/shards"
            fs, base = fsspec.core.url_to_fs(remote)
            for f in Path(local).rglob("*"):
                if f.is_file():
                    fs.put_file(str(f), f"{base}/{f.relative_to(local).as_posix()}")
            train = load_manifest(local).split("train").count
            print(f"{train} CIFAR-10-format training images (32×32×3 PNG in 1000-image shards), one pass, batch 250, best of {args.repeats}")
            print("| loader workers | local files, images/s | S3 (moto on 127.0.0.1), images/s | ratio S3 / local |")
            print("| --- | --- | --- | --- |")
            for workers in args.workers:
                best = {"local": 0.0, "s3": 0.0}
                for _ in range(args.repeats):  # interleaved, so a noisy machine moves both alike
                    best["local"] = max(best["local"], images_per_s(local, workers))
                    best["s3"] = max(best["s3"], images_per_s(remote, workers))
                print(f"| {workers} | {best['local']:.0f} | {best['s3']:.0f} | **{best['s3'] / best['local']:.2f}** |")
                if workers == 0:
                    fastest_pass = train / best["local"]
            hashing = min(hash_seconds(local) for _ in range(args.repeats))
            if 0 in args.workers:
                print(f"sha256 of the shards alone / one local pass (0 workers): {hashing:.3f} s / {fastest_pass:.3f} s = "
                      f"**{hashing / fastest_pass:.3f}**")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

"""What Ray Train costs: steady-state steps/s of the digits training loop run by Ray Train (1 worker) vs the same
loop in a plain process with the same thread count, and 2 workers (DDP over gloo) vs 1, in one run.

Usage: python bench/train_overhead.py [--steps 300] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from data_prep.loader import make_loader
from data_prep.manifest import load_manifest
from data_prep.shard import ShardOptions, shard_dataset
from pipelines.cluster import connect_ray
from ncsn.data import to_unit_interval
from ncsn.models import ScoreNetwork
from ncsn.train import train_steps
from pipelines.config import load_config
from pipelines.train import resolve_schedule, run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
WARMUP = 20


def plain_loop(cfg, shards: str, threads: int) -> float:
    """Steps/s of train_steps over the same loader in this process, after WARMUP steps."""
    torch.set_num_threads(threads)
    sigmas = resolve_schedule(cfg, load_manifest(shards)).tensor()
    torch.manual_seed(0)
    model = ScoreNetwork(cfg.model, sigmas)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    loader = make_loader(shards, cfg.train.batch_size, 0, 1, resampled=True, num_workers=0, seed=0)

    def batches():
        while True:
            for images, _ in loader:
                yield images
    t0 = None
    for stats in train_steps(model, batches(), sigmas, optimizer, num_steps=cfg.train.steps,
                             transform=lambda x: to_unit_interval(x, dequantize=True)):
        if stats.step == WARMUP:
            t0 = time.perf_counter()
    return (cfg.train.steps - WARMUP) / (time.perf_counter() - t0)


def ray_loop(cfg, shards: str, workers: int, run_dir: Path) -> tuple[float, float]:
    """(steady-state steps/s from the workers' own reports after the first, wall seconds including start-up)."""
    cfg.run_dir, cfg.cluster.num_workers = str(run_dir), workers
    t = time.perf_counter()
    run_training(cfg, shards)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["images_per_s"] for r in rows) / len(rows) / cfg.train.batch_size, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp) / "shards")
        shard_dataset(ShardOptions("digits", shard_size=300), shards, progress=False, connect=connect_ray)
        cfg = lambda: load_config(CONFIG, [f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.log_every={WARMUP}",
                                           f"train.checkpoint_every={args.steps}", f"train.sample_every={10 * args.steps}",
                                           "data.loader_workers=0", "tracking.system_metrics=false"])  # noqa: E731
        plain1 = plain_loop(cfg(), shards, threads=1)
        plain2 = plain_loop(cfg(), shards, threads=2)
        ray1, wall1 = ray_loop(cfg(), shards, 1, Path(tmp) / "ray1")
        ray2, wall2 = ray_loop(cfg(), shards, 2, Path(tmp) / "ray2")
    print(f"digits model, batch {args.batch} (global), {args.steps} steps, steady state after step {WARMUP}")
    print("| what | steps/s | wall s (with start-up) | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| plain process, 1 thread | {plain1:.2f} | | 1.00 |")
    print(f"| Ray Train, 1 worker (1 CPU → 1 thread) | {ray1:.2f} | {wall1:.1f} | **{ray1 / plain1:.2f}** of plain, 1 thread |")
    print(f"| plain process, 2 threads | {plain2:.2f} | | {plain2 / plain1:.2f} |")
    print(f"| Ray Train, 2 workers (DDP, gloo) | {ray2:.2f} | {wall2:.1f} | **{ray2 / ray1:.2f}** of 1 worker; {ray2 / plain2:.2f} of plain, 2 threads |")


if __name__ == "__main__":
    main()

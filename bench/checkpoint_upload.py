"""What rank 0's checkpoint work costs the training loop: steady-state seconds per training step of the digits loop with a
checkpoint every few steps, cluster.checkpoint_upload sync vs async, with Ray Train's storage on local disk and on an
S3-compatible server (moto's, on 127.0.0.1); with --grid, the 10×10 sample grid every few steps drawn by a validation
task off the workers, or inline by rank 0, vs none. Interleaved and repeated (best of N). Seconds per step
come from the MLflow timestamps of the loss rows (after the first), so start-up is left out.

Usage: python bench/checkpoint_upload.py [--steps 120] [--every 10] [--repeats 2] [--grid]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import S3Server, free_port  # noqa: E402

PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{PORT}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                  AWS_DEFAULT_REGION="us-east-1")

import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from data_prep.shard import ShardOptions, shard_dataset  # noqa: E402
from pipelines.cluster import connect_ray  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.train import run_training  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def seconds_per_step(run_dir: Path, mode: str, storage: str, steps: int, every: int, shards: str, grid: str = "none") -> float:
    """Steady-state s/step of one training run: MLflow's loss timestamps from the first row to the last. ``grid``: none, task
    (a grid at every checkpoint, drawn by a validation task) or inline (grids between checkpoints: rank 0 draws them; the
    only checkpoint is the last step's)."""
    checkpoint_every = steps if grid == "inline" else every
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}",
                               f"train.log_every={every}", f"train.sample_every={10 * steps if grid == 'none' else every}",
                               "tracking.system_metrics=false",
                               f"cluster.checkpoint_upload={mode}", f"cluster.storage_path={storage}", "data.loader_workers=0"])
    trained = run_training(cfg, shards)
    history = sorted(MlflowClient(trained.run.tracking_uri).get_metric_history(trained.run.run_id, "loss"), key=lambda m: m.step)
    return (history[-1].timestamp - history[0].timestamp) / 1000 / (history[-1].step - history[0].step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grid", action="store_true", help="compare an inline sample grid at every checkpoint with none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3", port=PORT).start()
        try:
            shards = str(Path(tmp) / "shards")
            connect_ray()
            shard_dataset(ShardOptions("digits", shard_size=500), shards, progress=False)
            if args.grid:
                return compare_grid(Path(tmp), shards, args)
            storages = {"local": str(Path(tmp) / "ray"), "s3": server.create_bucket("bench") + "/ray"}
            best: dict[tuple[str, str], float] = {}
            for repeat in range(args.repeats):
                for where, storage in storages.items():
                    for mode in ("sync", "async"):  # interleaved: both modes see the same machine state in each round
                        run_dir = Path(tmp) / f"run-{where}-{mode}-{repeat}"
                        t = seconds_per_step(run_dir, mode, f"{storage}/{mode}{repeat}", args.steps, args.every, shards)
                        best[where, mode] = min(best.get((where, mode), float("inf")), t)
                        print(f"round {repeat}: {where:5s} {mode:5s} {1000 * t:.1f} ms/step", flush=True)
            print(f"\ndigits, checkpoint every {args.every} steps, {args.steps} steps, best of {args.repeats}:")
            for where in storages:
                sync, asyn = best[where, "sync"], best[where, "async"]
                print(f"  {where:5s}  sync {1000 * sync:.1f} ms/step  async {1000 * asyn:.1f} ms/step  async/sync {asyn / sync:.2f}")
        finally:
            ray.shutdown()
            server.stop()


def compare_grid(tmp: Path, shards: str, args: argparse.Namespace) -> None:
    """Async upload to local disk; a grid every ``args.every`` steps drawn by a validation task, inline by rank 0, or none;
    interleaved. The inline runs save one checkpoint (the task runs one per grid), which favours inline."""
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for grid in ("task", "inline", "none"):
            t = seconds_per_step(tmp / f"grid-{grid}-{repeat}", "async", str(tmp / f"ray-grid-{grid}-{repeat}"), args.steps, args.every,
                                 shards, grid)
            best[grid] = min(best.get(grid, float("inf")), t)
            print(f"round {repeat}: grid {grid:6s} {1000 * t:.1f} ms/step", flush=True)
    print(f"\ndigits, a grid every {args.every} steps, {args.steps} steps, best of {args.repeats}:")
    for grid in ("task", "inline"):
        stall = (best[grid] - best["none"]) * args.every
        print(f"  {grid:6s} {1000 * best[grid]:.1f} ms/step vs none {1000 * best['none']:.1f}: ratio {best[grid] / best['none']:.2f}, "
              f"{stall:.2f} s per grid, {stall / (stall + 500 * best['none']):.1%} of the time at the digits preset's grid every 500 steps")


if __name__ == "__main__":
    main()

"""What the Ray sampler costs and gains: image-Langevin-steps/s of annealed Langevin sampling with the digits model
in a plain process (1 and 2 threads) vs `run_sampling` on 1 and 2 Ray actors (1 CPU, so 1 thread, each), in one run.

Usage: python bench/sample_throughput.py [--samples 400] [--chunk 50]
Throughput does not depend on the weights, so the model is the digits config's network, untrained.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from ncsn.checkpoint import Checkpoint, save_checkpoint
from ncsn.models import ScoreNetwork
from ncsn.sigmas import Schedule, geometric_sigmas
from pipelines.config import load_config
from pipelines.sample import SamplingActor, SamplingOptions, Weights, open_checkpoint, plan_chunks, resolve_options, run_sampling, write_chunk

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def make_checkpoint(path: Path, levels: int, steps_per_level: int) -> None:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = ScoreNetwork(cfg.model, geometric_sigmas(5.0, 0.01, levels))
    save_checkpoint(path, Checkpoint(cfg.model, Schedule(model.sigmas, 2e-5, steps_per_level), model.state_dict(), model.state_dict(), None, 0))


def plain_loop(checkpoint: Path, output: Path, options: SamplingOptions, threads: int) -> float:
    """Image-evaluations/s (samples × NFE per image) of the same chunks sampled one after another in this process."""
    torch.set_num_threads(threads)
    source = open_checkpoint(checkpoint)
    sampler, weights = SamplingActor(), Weights(source.payload)
    settings = resolve_options(source.checkpoint, options)
    t = time.perf_counter()
    for chunk in plan_chunks(options.num_samples, options.chunk_size):
        done = sampler.sample_chunk(weights, settings, *chunk)
        write_chunk(output, done.index, done.start, done.images)
    return options.num_samples * settings.nfe_per_image / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--steps-per-level", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    options = SamplingOptions(args.samples, seed=0, chunk_size=args.chunk, denoise=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint.pt"
        make_checkpoint(checkpoint, args.levels, args.steps_per_level)
        plain1 = plain_loop(checkpoint, Path(tmp) / "plain1", options, threads=1)
        plain2 = plain_loop(checkpoint, Path(tmp) / "plain2", options, threads=2)
        torch.set_num_threads(1)  # the driver only waits while the actors sample
        ray1 = run_sampling(checkpoint, Path(tmp) / "ray1", options, workers=1, progress=False)
        ray2 = run_sampling(checkpoint, Path(tmp) / "ray2", options, workers=2, progress=False)
    r1, r2 = ray1.nfe_per_s, ray2.nfe_per_s
    print(f"digits model (8×8, ngf 16), {args.samples} samples in chunks of {args.chunk}, "
          f"L = {args.levels} levels × T = {args.steps_per_level} steps; Ray figures include actor start-up and PNG writing")
    print("| what | image-evaluations/s | seconds | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| plain process, 1 thread | {plain1:.0f} | | 1.00 |")
    print(f"| Ray, 1 actor (1 CPU → 1 thread) | {r1:.0f} | {ray1.seconds:.1f} | **{r1 / plain1:.2f}** of plain, 1 thread |")
    print(f"| plain process, 2 threads | {plain2:.0f} | | {plain2 / plain1:.2f} |")
    print(f"| Ray, 2 actors | {r2:.0f} | {ray2.seconds:.1f} | **{r2 / r1:.2f}** of 1 actor; {r2 / plain2:.2f} of plain, 2 threads |")


if __name__ == "__main__":
    main()

"""Train an NCSN on scikit-learn's digits in one process, then write a sample grid and a Langevin
trajectory strip (NCSN Figures 4 and 5 on 8×8 digits).

Usage: python examples/digits.py [--out runs/figures] [--steps 2500] [--samples 100]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ncsn.images import save_image_grid, save_trajectory_strip
from ncsn.sampling import sample_images
from pipelines.reproduce import DIGITS, train_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/figures"))
    parser.add_argument("--steps", type=int, default=DIGITS["steps"])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    model, schedule = train_digits(args.steps)
    gen = torch.Generator().manual_seed(0)
    every = len(schedule.sigmas) * schedule.steps_per_level // 10
    result = sample_images(model, (args.samples, 1, 8, 8), schedule, trajectory_every=every, generator=gen,
                           levels_only=model.levels_only)
    logging.info("wrote %s", save_image_grid(result.samples, args.out / "digits_samples.png", nrow=10, scale=4))
    logging.info("wrote %s", save_trajectory_strip(result.trajectory, args.out / "digits_trajectory.png", num_samples=8, scale=4))


if __name__ == "__main__":
    main()

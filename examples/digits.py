"""Train an NCSN on scikit-learn's digits in one process, then write a sample grid and a Langevin
trajectory strip (NCSN Figures 4 and 5 on 8×8 digits).

Usage: python examples/digits.py [--out runs/figures] [--steps 2500] [--samples 100]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from data_prep.sources import DigitsSource
from ncsn.images import save_image_grid, save_trajectory_strip
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sampling import sample_images
from ncsn.sigmas import recommend_schedule
from ncsn.train import fit

# Settings measured to give recognisable digits in about 2½ minutes on 2 CPU cores (see tests/test_digits_quality.py).
DIGITS = dict(arch="ncsnv2", ngf=16, steps=2500, batch_size=64, lr=1e-3, grad_clip=10.0, ema_decay=0.995, steps_per_level=10)


def train_digits(steps: int = DIGITS["steps"], seed: int = 0):
    """Train the digits model; return (EMA model, schedule recommendation)."""
    source = DigitsSource()
    images = torch.from_numpy(np.stack([r.image for r in source.read("train", 0, source.count("train"))])).permute(0, 3, 1, 2).contiguous()
    schedule = recommend_schedule(images.float() / 255, steps_per_level=DIGITS["steps_per_level"])
    torch.manual_seed(seed)  # the initial weights: makes the run (and the quality test) repeatable
    model = ScoreNetwork(ModelConfig(DIGITS["arch"], 8, 1, DIGITS["ngf"]), schedule.sigmas())
    ema = fit(images, model, schedule.sigmas(), num_steps=steps, batch_size=DIGITS["batch_size"], lr=DIGITS["lr"],
              grad_clip=DIGITS["grad_clip"], ema_decay=DIGITS["ema_decay"], seed=seed, log_every=250)
    return ema.model, schedule


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
    every = schedule.num_levels * schedule.steps_per_level // 10
    result = sample_images(model, (args.samples, 1, 8, 8), schedule.schedule(), trajectory_every=every, generator=gen)
    logging.info("wrote %s", save_image_grid(result.samples, args.out / "digits_samples.png", nrow=10, scale=4))
    logging.info("wrote %s", save_trajectory_strip(result.trajectory, args.out / "digits_trajectory.png", num_samples=8, scale=4))


if __name__ == "__main__":
    main()

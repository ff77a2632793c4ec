"""How noisy the tuning objective is: classifier FID of one trained model over sampling seeds, at the sample counts
tuning uses, against the gap between two samplers of the same model (all 22 σ levels vs the 6 largest dropped).
Trials in a tuning job evaluate with the same seed, so the paired gap (same seed for A and B) is what tuning sees.

Usage: python bench/objective_noise.py --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits
(`make demo` writes both) [--sizes 100 250] [--seeds 4]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from ncsn.data import to_uint8
from ncsn.sampling import sample_images
from pipelines.evaluate import Evaluator
from pipelines.sample import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 250])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--drop", type=int, default=6, help="levels the second sampler leaves out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    eps, steps = ckpt.extra["eps"], ckpt.extra["steps_per_level"]
    c, s = ckpt.model_config.channels, ckpt.model_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = Evaluator(args.shards, "classifier", cache_dir=Path(tmp))

        def fids(n: int, sigmas: torch.Tensor) -> list[float]:
            out = []
            for seed in range(args.seeds):
                x = sample_images(model, (n, c, s, s), sigmas, eps, steps, generator=torch.Generator().manual_seed(seed)).samples
                out.append(evaluator.metrics(to_uint8(x).permute(0, 2, 3, 1).numpy())["fid_classifier"])
            return out

        print(f"classifier FID over {args.seeds} sampling seeds; sampler A: all {len(ckpt.sigmas)} levels, "
              f"B: the {args.drop} largest dropped; T = {steps}, ε = {eps:.3g}")
        print("| samples | A mean ± sd | B mean ± sd | gap B − A | paired gaps (same seed) | **sd of paired gap / gap** |")
        print("| --- | --- | --- | --- | --- | --- |")
        for n in args.sizes:
            a, b = fids(n, ckpt.sigmas), fids(n, ckpt.sigmas[args.drop:])
            paired = [y - x for x, y in zip(a, b)]
            gap = statistics.mean(paired)
            print(f"| {n} | {statistics.mean(a):.1f} ± {statistics.stdev(a):.1f} | {statistics.mean(b):.1f} ± {statistics.stdev(b):.1f} "
                  f"| {gap:.1f} | {', '.join(f'{g:.0f}' for g in paired)} | **{statistics.stdev(paired) / abs(gap):.2f}** |")


if __name__ == "__main__":
    main()

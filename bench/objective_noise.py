"""How noisy the tuning objective is: KID (the default objective) and FID on the classifier's features, for one trained
model over sampling seeds, against the gap between two samplers of the same model (all σ levels vs the 6 largest
dropped). Trials evaluate with the same seed, so the paired gap (same seed for A and B) is what tuning sees; the last
column compares one evaluation's bootstrap standard deviation with the spread over seeds.

Usage: python bench/objective_noise.py --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits
(`make demo` writes both) [--sizes 250 1000] [--seeds 6]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from ncsn.data import to_stored
from ncsn.sampling import sample_images
from pipelines.evaluate import Evaluator
from pipelines.sample import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--drop", type=int, default=6, help="levels the second sampler leaves out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    eps, steps = ckpt.extra["eps"], ckpt.extra["steps_per_level"]
    c, s = ckpt.model_config.channels, ckpt.model_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = Evaluator(args.shards, "classifier", cache_dir=Path(tmp), resamples=100)

        def evaluate(n: int, sigmas: torch.Tensor, seed: int) -> dict[str, float]:
            x = sample_images(model, (n, c, s, s), sigmas, eps, steps, generator=torch.Generator().manual_seed(seed)).samples
            return evaluator.metrics(to_stored(x), seed=seed)

        print(f"classifier features (extractor {evaluator.extractor_id}, test accuracy {evaluator.info['classifier_test_accuracy']:.3f}); "
              f"{args.seeds} sampling seeds; sampler A: all {len(ckpt.sigmas)} levels, B: the {args.drop} largest dropped; "
              f"T = {steps}, ε = {eps:.3g}")
        print("| metric | samples | A mean ± sd | B mean ± sd | gap B − A | **sd of paired gap / gap** | bootstrap sd / seed sd (A) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n in args.sizes:
            a = [evaluate(n, ckpt.sigmas, seed) for seed in range(args.seeds)]
            b = [evaluate(n, ckpt.sigmas[args.drop:], seed) for seed in range(args.seeds)]
            for metric in ("kid_classifier", "fid_classifier"):
                va, vb = [r[metric] for r in a], [r[metric] for r in b]
                paired = [y - x for x, y in zip(va, vb)]
                gap = statistics.mean(paired)
                boot = statistics.mean((r[f"{metric}_high"] - r[metric]) / 1.96 for r in a)
                print(f"| {metric} | {n} | {statistics.mean(va):.4g} ± {statistics.stdev(va):.2g} | {statistics.mean(vb):.4g} ± "
                      f"{statistics.stdev(vb):.2g} | {gap:.4g} | **{statistics.stdev(paired) / abs(gap):.2f}** | {boot / statistics.stdev(va):.2f} |")


if __name__ == "__main__":
    main()

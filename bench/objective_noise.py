"""How noisy the tuning objective is: KID (the default objective) and FID on the classifier's features, for one trained
model over sampling seeds, against the gap between two samplers of the same model (all σ levels vs the 6 largest
dropped; --drop 6 9 12 measures several such pairs, one row each, against the same A). Trials evaluate with the same
seed, so the paired gap (same seed for A and B) is what tuning sees; with one seed the two samplers share their last
steps' noise (ncsn.sampling's common random numbers), and the column "sd of the gap, B on other seeds" is the same
comparison without that sharing, measured side by side. The last column compares one evaluation's own sd (KID: the
half-width of its 95% interval / 1.96; FID: its bootstrap sd) with the spread over seeds. The confirmation stage compares trials by the mean of --confirm-seeds paired
gaps: its column is that mean's sd / gap (the paired sd / √k), and, with at least 2k seeds, the sd measured over
disjoint groups of k seeds.

Usage: python bench/objective_noise.py --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits
(`make demo` writes both) [--sizes 250 1000] [--seeds 6] [--drop 6] [--confirm-seeds 3] [--split validation]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

import torch

from ncsn.sigmas import Schedule
from pipelines.tune.objective import ObjectiveSpec, sample_and_score
from pipelines.sample import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--drop", type=int, nargs="+", default=[6], help="levels the second sampler leaves out (one pair each)")
    parser.add_argument("--confirm-seeds", type=int, default=3, help="seeds the selection averages (tune.confirm_seeds)")
    parser.add_argument("--split", default="validation", help="the reference split (the search's: validation)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    eps, steps = ckpt.schedule.eps, ckpt.schedule.steps_per_level
    k = args.confirm_seeds
    with tempfile.TemporaryDirectory() as tmp:
        spec = ObjectiveSpec(args.shards, args.split, "classifier", tmp, 0, resamples=100, denoise=ckpt.schedule.denoise, every=0)
        evaluator = spec.evaluator()

        def evaluate(n: int, sigmas: torch.Tensor, seed: int) -> dict[str, float]:
            return sample_and_score(evaluator, model, Schedule(sigmas, eps, steps), spec, seed, num_samples=n)[0]

        print(f"classifier features (extractor {evaluator.extractor_id}, test accuracy {evaluator.info['classifier_test_accuracy']:.3f}); "
              f"{args.seeds} sampling seeds; sampler A: all {len(ckpt.sigmas)} levels, B: the d largest dropped; "
              f"T = {steps}, ε = {eps:.3g}, denoise {spec.denoise}")
        print(f"| metric | samples | d (B starts at σ) | A mean ± sd | B mean ± sd | gap B − A | sd of paired gap (B on other seeds) | "
              f"**sd of paired gap / gap** | mean of {k} paired gaps: sd / gap (√{k}; measured) | own sd / seed sd (A) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in args.sizes:
            a = [evaluate(n, ckpt.sigmas, seed) for seed in range(args.seeds)]
            for drop in args.drop:
                b = [evaluate(n, ckpt.sigmas[drop:], seed) for seed in range(args.seeds)]
                other = [evaluate(n, ckpt.sigmas[drop:], args.seeds + seed) for seed in range(args.seeds)]
                for metric in ("kid_std_classifier", "fid_classifier"):
                    va, vb = [r[metric] for r in a], [r[metric] for r in b]
                    unshared = statistics.stdev(r[metric] - x for x, r in zip(va, other))
                    paired = [y - x for x, y in zip(va, vb)]
                    gap, sd = statistics.mean(paired), statistics.stdev(paired)
                    groups = [statistics.mean(paired[i:i + k]) for i in range(0, len(paired) - k + 1, k)]
                    measured = f"{statistics.stdev(groups) / abs(gap):.2f} ({len(groups)} groups)" if len(groups) >= 2 else "–"
                    boot = statistics.mean(r[f"{metric}_sd"] if f"{metric}_sd" in r else (r[f"{metric}_high"] - r[metric]) / 1.96
                                           for r in a)
                    print(f"| {metric} | {n} | {drop} ({ckpt.sigmas[drop]:.3g}) | {statistics.mean(va):.4g} ± {statistics.stdev(va):.2g} | "
                          f"{statistics.mean(vb):.4g} ± {statistics.stdev(vb):.2g} | {gap:.4g} | {sd:.2g} ({unshared:.2g}) | "
                          f"**{sd / abs(gap):.2f}** | **{sd / k ** 0.5 / abs(gap):.2f}**; {measured} | {boot / statistics.stdev(va):.2f} |",
                          flush=True)

if __name__ == "__main__":
    main()

"""How often the evaluator's intervals cover what they claim, over independent draws: KID's 95% interval (the unbiased
MMD² ± 1.96 jackknife sd) against the population KID, and FID's "value ± 1.96 sd" (its bootstrap spread) against the
FID estimator's own expectation at those counts (FID is biased, so that is all its spread can describe); beside them the
two alternatives for KID: ± 1.96 × the root of the unbiased variance estimate (negative in some draws: a zero-width
interval there), and the old interval, ± 1.96 bootstrap sd.

Populations with an exact answer: a pool of the trained digits model's samples and the pool of all 1797 real digits,
each a finite population that draws are taken from with replacement, so the population KID is the V-statistic over
both pools (exact) and the draws are independent. Features: the classifier's (128-d, the demo's shape, 500 samples
against 297 references), and, for Inception's dimension, a fixed random convolution (3×3, 2048 channels, seed 0), ReLU
and global average pooling over the same images: non-negative, spatially averaged 2048-d features like Inception's pool3
(no Inception weights are available offline). KID's features are scaled by a fixed scaler fitted on the training split,
as in the pipeline.

Usage: python bench/interval_coverage.py --checkpoint runs/digits/model/checkpoint.pt --shards runs/digits/shards/digits
[--draws 300] [--pool 3000] [--quick]. The last line: kid_coverage=<rate> fid_coverage=<rate> at the demo's shape.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ncsn.data import to_stored
from ncsn.metrics import Scaler, bootstrap_spread, frechet_distance, kid, mmd2_unbiased_variance, polynomial_kernel
from ncsn.sampling import sample_images
from pipelines.evaluate import Evaluator, read_split
from pipelines.sample import load_model


def population_kid(a: np.ndarray, b: np.ndarray, block: int = 2000) -> float:
    """MMD² between the uniform distributions on the rows of ``a`` and ``b`` (pairs of one row with itself included: a
    draw with replacement can repeat a row), in blocks."""
    def mean_kernel(x: np.ndarray, y: np.ndarray) -> float:
        return sum(polynomial_kernel(x[i:i + block], y[j:j + block]).sum() for i in range(0, len(x), block)
                   for j in range(0, len(y), block)) / (len(x) * len(y))
    return mean_kernel(a, a) + mean_kernel(b, b) - 2 * mean_kernel(a, b)


def random_pool_features(images: np.ndarray, width: int = 2048) -> np.ndarray:
    """uint8 NHWC images through a fixed random 3×3 convolution of ``width`` channels (seed 0), ReLU and global average
    pooling: (N, width) non-negative features."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    weight = torch.randn(width, x.shape[1], 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 3
    with torch.no_grad():
        return torch.relu(torch.nn.functional.conv2d(x, weight)).mean((2, 3)).numpy()


def old_kid_interval(x: np.ndarray, y: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The previous interval: ± 1.96 bootstrap sd of the U-statistic, both sets resampled, repeated rows not paired."""
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)

    def statistic(ix: np.ndarray, iy: np.ndarray) -> float:
        def off_ties(k, idx):
            return k[np.ix_(idx, idx)][idx[:, None] != idx[None, :]].mean()
        return off_ties(kxx, ix) + off_ties(kyy, iy) - 2 * kxy[np.ix_(ix, iy)].mean()
    value = statistic(np.arange(len(x)), np.arange(len(y)))
    sd = np.std([statistic(rng.integers(len(x), size=len(x)), rng.integers(len(y), size=len(y))) for _ in range(resamples)], ddof=1)
    return value - 1.96 * sd, value + 1.96 * sd


def coverage(name: str, model: np.ndarray, real: np.ndarray, scale: Scaler, n: int, m: int, draws: int, resamples: int,
             old_draws: int, seed: int) -> tuple[float, float]:
    """Coverage of KID's and FID's intervals over ``draws`` independent (n, m) draws; prints one table row."""
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    sm, sr = scale(model), scale(real)
    truth_kid = population_kid(sm, sr)
    draw = [(rng.integers(len(model), size=n), rng.integers(len(real), size=m)) for _ in range(2 * draws)]
    fids = [frechet_distance(model[ix], real[iy]) for ix, iy in draw[draws:]]  # the FID estimator's expectation at (n, m)
    truth_fid = float(np.mean(fids))
    kid_hits, fid_hits, old_hits, unbiased_hits, negative, widths, values, sds = 0, 0, 0, 0, 0, [], [], []
    for k, (ix, iy) in enumerate(draw[:draws]):
        est = kid(sm[ix], sr[iy])
        kid_hits += est.low <= truth_kid <= est.high
        widths.append(est.high - est.low)
        values.append(est.value)
        variance = mmd2_unbiased_variance(polynomial_kernel(sm[ix], sm[ix]), polynomial_kernel(sr[iy], sr[iy]), polynomial_kernel(sm[ix], sr[iy]))
        unbiased_hits += abs(est.value - truth_kid) <= 1.96 * np.sqrt(max(variance, 0.0))
        negative += variance < 0
        x, y = model[ix], real[iy]
        fid = bootstrap_spread(lambda a, b: frechet_distance(x[a], y[b]), n, m, resamples, seed + k)
        fid_hits += abs(fid.value - truth_fid) <= 1.96 * fid.sd
        sds.append(fid.sd)
        if k < old_draws:
            low, high = old_kid_interval(sm[ix], sr[iy], resamples, rng)
            old_hits += low <= truth_kid <= high
    kid_rate, fid_rate = kid_hits / draws, fid_hits / draws
    print(f"| {name} | {n} vs {m} | {truth_kid:.4g} | **{kid_rate:.3f}** | {np.mean(widths) / 3.92:.3g} / {np.std(values, ddof=1):.3g} | "
          f"{unbiased_hits / draws:.3f} ({negative / draws:.0%} negative) | {old_hits / max(old_draws, 1):.3f} ({old_draws}) | "
          f"{truth_fid:.4g} | **{fid_rate:.3f}** | {np.mean(sds):.3g} / {np.std(fids, ddof=1):.3g} | {time.perf_counter() - start:.0f} |",
          flush=True)
    return kid_rate, fid_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--pool", type=int, default=3000, help="model samples in the model's population")
    parser.add_argument("--resamples", type=int, default=100, help="bootstrap resamples behind FID's sd (and the old KID interval)")
    parser.add_argument("--old-draws", type=int, default=100, help="draws for the old bootstrap interval (slow)")
    parser.add_argument("--quick", action="store_true", help="a 1000-sample pool, 100 draws, 30 resamples")
    parser.add_argument("--cache-dir", help="the evaluation cache holding these shards' classifier (default: a new one)")
    args = parser.parse_args()
    if args.quick:
        args.pool, args.draws, args.resamples, args.old_draws = 1000, 100, 30, 30
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    start = time.perf_counter()
    shape = (args.pool, ckpt.model_config.channels, ckpt.model_config.image_size, ckpt.model_config.image_size)
    samples = to_stored(sample_images(model, shape, ckpt.schedule, generator=torch.Generator().manual_seed(123),
                                      levels_only=model.levels_only).samples)
    real = np.concatenate([read_split(args.shards, split)[0] for split in ("train", "validation", "test")])
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = Evaluator(args.shards, "classifier", cache_dir=Path(args.cache_dir or tmp), resamples=10, progress=False)
        features = {name: evaluator.features(images)["features"] for name, images in (("model", samples), ("real", real))}
        scale = evaluator.scaler()
        wide = {name: random_pool_features(images) for name, images in (("model", samples), ("real", real))}
        wide_scale = Scaler.fit(random_pool_features(read_split(args.shards, "train")[0]))
    print(f"{args.pool} model samples (seed 123) and {len(real)} real digits, {time.perf_counter() - start:.0f} s; "
          f"{args.draws} independent draws with replacement per shape, {args.resamples} bootstrap resamples")
    print("| features | counts | population KID | KID 95% coverage (jackknife) | KID sd: jackknife / over draws | with the unbiased "
          "variance instead | old bootstrap interval (draws) | E[FID] at the counts | FID ± 1.96 sd coverage | FID sd: bootstrap / "
          "over draws | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    wide_rates = coverage("random conv, ReLU, mean pool: 2048-d", wide["model"], wide["real"], wide_scale, 500, 297, args.draws, args.resamples,
                          args.old_draws, 1)
    demo = coverage("classifier, 128-d", features["model"], features["real"], scale, 500, 297, args.draws, args.resamples,
                    args.old_draws, 0)
    print(f"d=2048: kid_coverage={wide_rates[0]:.3f} fid_coverage={wide_rates[1]:.3f}")
    print(f"kid_coverage={demo[0]:.3f} fid_coverage={demo[1]:.3f}")


if __name__ == "__main__":
    main()

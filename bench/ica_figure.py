"""Hyvärinen (2005) Figure 1: log10 estimation error of score matching and MLE vs log10 sample size, to PNG.

Usage: python bench/ica_figure.py [--out runs/figures/ica_error.png] [--reps 10] [--dim 4]
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ncsn.classical import ica_error, ica_mle, ica_sample, ica_score_matching

log = logging.getLogger("ica_figure")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/figures/ica_error.png"))
    parser.add_argument("--reps", type=int, default=10, help="data sets per sample size (median is plotted)")
    parser.add_argument("--dim", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(args.dim, args.dim, dtype=torch.float64, generator=gen)
    w_true = torch.linalg.inv(mixing)
    sizes = [int(10**e) for e in (2.5, 3.0, 3.5, 4.0, 4.5, 5.0)]
    curves: dict[str, list[float]] = {"score matching": [], "maximum likelihood": []}
    for n in sizes:
        errs = {k: [] for k in curves}
        for _ in range(args.reps):
            x = ica_sample(n, mixing, gen)
            errs["score matching"].append(ica_error(ica_score_matching(x), w_true))
            errs["maximum likelihood"].append(ica_error(ica_mle(x), w_true))
        for k in curves:
            curves[k].append(math.log10(statistics.median(errs[k])))
        log.info("n=%6d  log10 err: SM %.3f  MLE %.3f", n, curves["score matching"][-1], curves["maximum likelihood"][-1])
    fig, ax = plt.subplots(figsize=(5, 4))
    for (k, ys), style in zip(curves.items(), ("-o", "--s")):
        ax.plot([math.log10(n) for n in sizes], ys, style, label=k)
    ax.set_xlabel("log10 sample size")
    ax.set_ylabel("log10 estimation error")
    ax.set_title(f"Basic ICA, {args.dim} logistic sources")
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""NCSN Figure 3: exact samples, Langevin and annealed Langevin (exact scores) of the 0.2/0.8 mixture, to PNG.

Usage: python bench/mixture_figure.py [--out runs/figures/mixture.png] [--n 1280] [--learned]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ncsn.figures import mixture_figure

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/figures/mixture.png"))
    parser.add_argument("--n", type=int, default=1280)
    parser.add_argument("--learned", action="store_true", help="use a DSM-trained MLP instead of the exact score")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mixture_figure(args.out, n=args.n, learned=args.learned)

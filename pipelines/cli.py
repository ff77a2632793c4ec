"""The `ncsn-pipeline` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from ncsn.figures import mixture_figure

    out = Path(args.output) / "mixture.png"
    shares = mixture_figure(out, learned=True)
    print(f"Figure 3 of the NCSN paper (learned scores): {out}")
    print("share of samples in the weight-0.2 mode: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncsn-pipeline", description="NCSN score-based generative models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="2-D toy demo: DSM-trained score network, Langevin vs annealed Langevin")
    demo.add_argument("--output", default="runs/demo", help="directory for the figure (default: runs/demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

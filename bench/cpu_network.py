"""The score network on CPU with PyTorch's stock ELU and pooling layout against the project's (ncsn/models/refinenet.py:
ELU through the vectorised exp, channels-last memory for the 5×5 pooling): the two ops alone, a DSM training step and
a sampler forward, interleaved and each the best of --repeats; ratios stock / project.

Usage: python bench/cpu_network.py [--repeats 5] [--threads 2]   (the digits model: NCSNv2, 8×8×1, ngf 16, L = 22)
       python bench/cpu_network.py --image-size 32 --channels 3 --ngf 32 --batch 16   (a CIFAR-sized model)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_best  # noqa: E402

from ncsn.losses import dsm_loss
from ncsn.models import ModelConfig, ScoreNetwork, refinenet
from ncsn.sigmas import geometric_sigmas


@contextlib.contextmanager
def stock():
    """The network as plain PyTorch runs it: F.elu, pooling in the default (channels-first) layout."""
    with mock.patch.object(refinenet, "elu", F.elu), mock.patch.object(refinenet, "_pool_layout", lambda x: x):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--levels", type=int, default=22)
    parser.add_argument("--batch", type=int, default=64, help="training batch; the sampler forward takes 100 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sigmas = geometric_sigmas(4.8, 0.01, args.levels)
    model = ScoreNetwork(ModelConfig("ncsnv2", args.image_size, args.channels, args.ngf), sigmas)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    shape = (args.channels, args.image_size, args.image_size)
    x_train, x_sample = torch.rand(args.batch, *shape), torch.rand(100, *shape)
    h = torch.randn(100, 2 * args.ngf, args.image_size // 2, args.image_size // 2)  # a RefineNet block's activations

    def train_step() -> None:
        loss = dsm_loss(model, x_train, sigmas).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sampler_forward() -> None:
        model(x_sample, sigmas[[0] * 100])

    def with_stock(fn):
        def run() -> None:
            with stock():
                fn()
        return run

    cases = {
        "ELU (forward)": (lambda: F.elu(h), lambda: refinenet.elu(h), 50),
        "5×5 max pool": (lambda: F.max_pool2d(h, 5, 1, 2), lambda: F.max_pool2d(refinenet._pool_layout(h), 5, 1, 2), 50),
        f"train step, batch {args.batch}": (with_stock(train_step), train_step, 5),
        "sampler forward, 100 images": (with_stock(sampler_forward), sampler_forward, 5),
    }
    print(f"NCSNv2 {args.image_size}×{args.image_size}×{args.channels}, ngf {args.ngf}, L = {args.levels}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'what':30s} {'stock ms':>9s} {'project ms':>11s} {'stock / project':>16s}")
    for name, (slow, fast, calls) in cases.items():
        best = interleaved_best({"stock": slow, "project": fast}, calls, args.repeats, torch.device("cpu"))
        print(f"{name:30s} {best['stock'] * 1e3:9.2f} {best['project'] * 1e3:11.2f} {best['stock'] / best['project']:16.2f}")


if __name__ == "__main__":
    main()

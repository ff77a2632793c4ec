"""Cost of the CIFAR-10 NCSN on this machine: forward+backward per batch, Langevin-step samples/s, and the
GFLOP/s both achieve as a fraction of this CPU's own fp32 matmul GFLOP/s, measured in the same run.

Usage: python bench/model_step.py [--batch 16] [--repeats 3] [--ngf 128]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ncsn.losses import dsm_loss
from ncsn.models import ModelConfig, ScoreNetwork, count_parameters
from ncsn.sigmas import geometric_sigmas


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ngf", type=int, default=128)
    args = parser.parse_args()
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    model = ScoreNetwork(ModelConfig("ncsn", 32, 3, args.ngf), sigmas)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(args.batch, 3, 32, 32)

    def train_step() -> None:
        loss = dsm_loss(model, x, sigmas).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    level = sigmas[[0] * args.batch]

    @torch.no_grad()
    def langevin_step() -> None:
        x.add_(model(x, level), alpha=1e-6)

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul_gflops = 2 * n**3 / best_time(lambda: a @ b, args.repeats) / 1e9
    t_train, t_lang = best_time(train_step, args.repeats), best_time(langevin_step, args.repeats)
    f_train, f_lang = flops_of(train_step), flops_of(langevin_step)
    print(f"CIFAR-10 NCSN (ngf={args.ngf}, {count_parameters(model) / 1e6:.2f} M params), batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul {n}x{n}:            {matmul_gflops:8.1f} GFLOP/s (the machine's reference)")
    print(f"train step (fwd+bwd+Adam):     {t_train:8.3f} s/batch  {args.batch / t_train:7.2f} img/s  "
          f"{f_train / t_train / 1e9:7.1f} GFLOP/s = {f_train / t_train / 1e9 / matmul_gflops:.2f} of matmul")
    print(f"Langevin step (1 forward):     {t_lang:8.3f} s/batch  {args.batch / t_lang:7.2f} samples/s  "
          f"{f_lang / t_lang / 1e9:7.1f} GFLOP/s = {f_lang / t_lang / 1e9 / matmul_gflops:.2f} of matmul")
    print(f"GFLOP per image: train {f_train / args.batch / 1e9:.2f}, forward {f_lang / args.batch / 1e9:.2f}")


if __name__ == "__main__":
    main()

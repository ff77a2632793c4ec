"""The CIFAR-10 NCSN and NCSNv2 DSM training step on one GPU in five modes (fp32, TF32, bf16 autocast, + channels_last,
+ torch.compile): images/s and achieved TFLOP/s as a fraction of the bf16 matmul rate measured in the same run, the
modes interleaved and each the best of --repeats. Then the first --curve-steps losses in bf16 against fp32 (same seed,
same batches), beside fp32 against fp32 with another noise seed: the noise bf16 has to stay within.

Usage: python bench/gpu_step.py [--batch 128] [--repeats 3] [--steps 10] [--curve-steps 200]
On a CPU (to check the script): python bench/gpu_step.py --device cpu --ngf 16 --batch 4 --steps 2 --curve-steps 10 --modes fp32 bf16
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_best, sync  # noqa: E402

from ncsn.losses import dsm_loss
from ncsn.models import ModelConfig, ScoreNetwork, count_parameters
from ncsn.sigmas import geometric_sigmas

MODES = ("fp32", "tf32", "bf16", "channels_last", "compile")
SCHEDULES = {"ncsn": (1.0, 0.01, 10), "ncsnv2": (50.0, 0.01, 232)}  # the papers' CIFAR-10 schedules


def matmul_tflops(device: torch.device, n: int, repeats: int) -> float:
    """bf16 n×n×n matmul rate: the reference the training step is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best / 1e12


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Step:
    """One arch in one mode: a model, Adam, and a training step on a fixed batch."""

    def __init__(self, arch: str, mode: str, ngf: int, batch: int, device: torch.device, seed: int = 0):
        self.mode, self.device = mode, device
        self.sigmas = geometric_sigmas(*SCHEDULES[arch]).to(device)
        torch.manual_seed(seed)
        self.model = ScoreNetwork(ModelConfig(arch, 32, 3, ngf), self.sigmas).to(device)
        self.params = count_parameters(self.model)
        self.fmt = torch.channels_last if mode in ("channels_last", "compile") else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        self.net = torch.compile(self.model) if mode == "compile" else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-4)
        self.x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=self.fmt)

    def autocast(self):
        if self.mode == "fp32" or self.mode == "tf32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def __call__(self, x: torch.Tensor | None = None, generator: torch.Generator | None = None) -> float:
        set_tf32(self.mode != "fp32")
        with self.autocast():
            loss = dsm_loss(self.net, self.x if x is None else x, self.sigmas, generator=generator).loss
        self.opt.zero_grad(set_to_none=True)
        loss.float().backward()
        self.opt.step()
        return loss.detach()


def flops_per_step(arch: str, ngf: int, batch: int, device: torch.device) -> int:
    step = Step(arch, "fp32", ngf, batch, device)
    step()  # Adam's state exists before counting
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def loss_curves(arch: str, ngf: int, batch: int, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Per-step losses of fp32 (noise seed 0 and 1) and bf16 (seed 0) over the same batches."""
    data = torch.Generator().manual_seed(123)
    batches = [torch.rand(batch, 3, 32, 32, generator=data) for _ in range(steps)]
    curves = {}
    for name, mode, seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32_other_seed", "fp32", 1)):
        step = Step(arch, mode, ngf, batch, device)
        noise = torch.Generator(device=device).manual_seed(seed)
        curves[name] = [step(b.to(device), noise).item() for b in batches]
    return curves


def smooth(values: list[float], width: int) -> torch.Tensor:
    t = torch.tensor(values)
    return t.unfold(0, width, 1).mean(1) if len(t) >= width else t.mean().reshape(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--archs", nargs="+", default=["ncsn", "ncsnv2"], choices=list(SCHEDULES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--matmul-n", type=int, default=8192)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; batch {args.batch}, ngf {args.ngf}")
    ref = matmul_tflops(device, args.matmul_n if device.type == "cuda" else min(args.matmul_n, 1024), args.repeats)
    print(f"bf16 matmul: {ref:.1f} TFLOP/s (the reference)")
    for arch in args.archs:
        flops = flops_per_step(arch, args.ngf, args.batch, device)
        steps = {mode: Step(arch, mode, args.ngf, args.batch, device) for mode in args.modes}
        for step in steps.values():  # warm-up (compilation, cuDNN autotuning)
            for _ in range(3):
                step()
        best = interleaved_best(steps, args.steps, args.repeats, device)
        params = next(iter(steps.values())).params
        print(f"\n{arch} ({params / 1e6:.2f} M parameters, L = {SCHEDULES[arch][2]}), {flops / args.batch / 1e9:.1f} GFLOP per image per step")
        print(f"{'mode':<14} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>9} {'of bf16 matmul':>15}")
        for mode, seconds in best.items():
            tflops = flops / seconds / 1e12
            print(f"{mode:<14} {seconds * 1e3:9.1f} {args.batch / seconds:9.1f} {tflops:9.2f} {tflops / ref:15.3f}")
        del steps
        curves = loss_curves(arch, args.ngf, args.batch, args.curve_steps, device)
        width = max(1, min(20, args.curve_steps // 5))
        fp32, bf16, other = (smooth(curves[k], width) for k in ("fp32", "bf16", "fp32_other_seed"))
        print(f"loss curve, first {args.curve_steps} steps (moving mean of {width}): max |bf16 − fp32| = {(bf16 - fp32).abs().max():.4f}; "
              f"max |fp32 seed 1 − fp32 seed 0| = {(other - fp32).abs().max():.4f} (the noise); "
              f"final fp32 {fp32[-1]:.4f}, bf16 {bf16[-1]:.4f}")


if __name__ == "__main__":
    main()

"""Annealed Langevin sampling of the CIFAR-10 NCSN on one GPU at the largest batch that fits: image·steps/s for the
eager step, the step captured in a CUDA graph, and the step under torch.compile, interleaved and each the best of
--repeats; from the best, the time the paper's evaluation sampler (L = 10, T = 100, 50 000 images) takes on one GPU.

Usage: python bench/gpu_sampling.py [--repeats 3] [--steps 20] [--max-batch 8192] [--precision fp32|bf16]
On a CPU (to check the script): python bench/gpu_sampling.py --device cpu --ngf 16 --max-batch 8 --steps 2
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_best, sync  # noqa: E402

from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import geometric_sigmas

PAPER = {"levels": 10, "steps_per_level": 100, "images": 50_000}  # NCSN §5: L = 10, T = 100; FID on 50k samples


class LangevinStep:
    """x ← x + (α/2) s(x, σ) + √α z in place, on a fixed batch (Algorithm 1's inner step)."""

    def __init__(self, model: ScoreNetwork, batch: int, device: torch.device, precision: str):
        self.model, self.device = model, device
        self.x = torch.rand(batch, 3, 32, 32, device=device)
        self.sigma = model.sigmas[[0] * batch]
        self.alpha = 1e-5
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    @torch.no_grad()
    def __call__(self) -> None:
        with self.autocast:
            score = self.model(self.x, self.sigma)
        self.x.add_(score.float(), alpha=0.5 * self.alpha).add_(torch.randn_like(self.x), alpha=math.sqrt(self.alpha))


def graphed(step: LangevinStep):
    """The step captured once in a CUDA graph and replayed (static input and output buffers)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def largest_batch(model: ScoreNetwork, device: torch.device, cap: int, precision: str) -> int:
    """The largest power of two ≤ cap whose Langevin step runs without running out of memory."""
    batch, fits = 1, 1
    while batch <= cap:
        try:
            LangevinStep(model, batch, device, precision)()
            sync(device)
            fits, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ngf", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20, help="timed Langevin steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = ScoreNetwork(ModelConfig("ncsn", 32, 3, args.ngf), geometric_sigmas(1.0, 0.01, PAPER["levels"])).to(device).eval()
    batch = largest_batch(model, device, args.max_batch, args.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; NCSN ngf {args.ngf}, {args.precision}; batch {batch}")
    variants = {"eager": LangevinStep(model, batch, device, args.precision)}
    if device.type == "cuda":
        variants["cuda_graph"] = graphed(LangevinStep(model, batch, device, args.precision))
    compiled = LangevinStep(torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default"), batch,
                            device, args.precision)
    variants["compile"] = compiled
    for fn in variants.values():  # warm-up, compilation included
        for _ in range(3):
            fn()
    best = interleaved_best(variants, args.steps, args.repeats, device)
    eager = best["eager"]
    for key, seconds in best.items():
        print(f"{key:<11} {seconds * 1e3:9.2f} ms/step  {batch / seconds:12.0f} image·steps/s  {eager / seconds:5.2f}× eager")
    rate = batch / min(best.values())
    total = PAPER["images"] * PAPER["levels"] * PAPER["steps_per_level"] / rate
    print(f"paper's evaluation sampler (L = {PAPER['levels']}, T = {PAPER['steps_per_level']}, {PAPER['images']} images) at the best "
          f"rate: {total / 3600:.2f} h on this device")


if __name__ == "__main__":
    main()

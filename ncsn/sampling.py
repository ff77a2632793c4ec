"""Langevin samplers: plain Langevin dynamics, annealed Langevin dynamics (NCSN Algorithm 1), inpainting."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ncsn._checks import noise_schedule, positive, positive_int
from ncsn.sigmas import Schedule

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
NoiseScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _draw(fn, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``fn`` (torch.randn or torch.rand) drawn on the generator's device, then moved to ``like``'s: a CPU generator
    gives the same numbers whether the chain runs on the CPU or a GPU."""
    device = generator.device if generator is not None else like.device
    return fn(shape, dtype=like.dtype, device=device, generator=generator).to(like.device, non_blocking=True)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return _draw(torch.randn, x.shape, x, generator)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on ``keys`` alone (numpy's SeedSequence hashing): independent streams per key tuple."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] % (2**63))


class _StepNoise:
    """z for each Langevin step from its own stream, keyed by the steps left to the chain's end: two samplers with the
    same seed draw the same z in their last steps whatever their σ schedules (common random numbers), so their paired
    difference is not drowned by the noise of two independent chains. Each step's z is still N(0, I), independent."""

    def __init__(self, generator: torch.Generator | None, like: torch.Tensor):
        self.device = generator.device if generator is not None else like.device
        self.base = int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device).item())

    def __call__(self, x: torch.Tensor, steps_left: int) -> torch.Tensor:
        return _noise(x, torch.Generator(device=self.device).manual_seed(derived_seed(self.base, steps_left)))


@torch.no_grad()
def langevin_dynamics(
    score_fn: ScoreFn,
    x: torch.Tensor,
    step_size: float,
    n_steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_t = x_{t−1} + (ε/2) ∇log p(x_{t−1}) + √ε z_t for ``n_steps`` steps (NCSN eq. 2)."""
    positive("step_size", step_size)
    positive_int("n_steps", n_steps)
    for _ in range(n_steps):
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * _noise(x, generator)
    return x


@dataclass
class AnnealedLangevinResult:
    """Final samples and, when asked for, snapshots of the chain (the paper's Figure 4)."""

    samples: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def annealed_langevin_dynamics(
    score_fn: NoiseScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float,
    steps_per_level: int,
    denoise: bool = False,
    trajectory_every: int | None = None,
    generator: torch.Generator | None = None,
) -> AnnealedLangevinResult:
    """NCSN Algorithm 1: T Langevin steps at each σ_i with α_i = ε σ_i²/σ_L², from σ_1 down to σ_L.

    ``denoise`` adds the final step x + σ_L² s(x, σ_L) (Tweedie; NCSNv2 §4); ``trajectory_every`` k
    keeps a copy of x every k steps, plus the start and the end. Each step's z comes from ``generator`` through a stream
    of its own, keyed by the steps left (_StepNoise): samplers that end alike share their last steps' noise.
    """
    noise_schedule(sigmas)
    positive("eps", eps)
    positive_int("steps_per_level", steps_per_level)
    if trajectory_every is not None:
        positive_int("trajectory_every", trajectory_every)
    sigma_min = sigmas[-1].item()
    trajectory = [x.clone()] if trajectory_every else []
    noise, total = _StepNoise(generator, x), len(sigmas) * steps_per_level
    step = 0
    for sigma in sigmas.tolist():
        alpha = eps * sigma**2 / sigma_min**2
        sigma_b = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(steps_per_level):
            x = x + 0.5 * alpha * score_fn(x, sigma_b) + math.sqrt(alpha) * noise(x, total - step)
            step += 1
            if trajectory_every and step % trajectory_every == 0:
                trajectory.append(x.clone())
    if denoise:
        sigma_b = torch.full((x.shape[0],), sigma_min, dtype=x.dtype, device=x.device)
        x = x + sigma_min**2 * score_fn(x, sigma_b)
    if trajectory_every and (step % trajectory_every != 0 or denoise):
        trajectory.append(x.clone())
    return AnnealedLangevinResult(x, trajectory)


@torch.no_grad()
def inpaint(
    score_fn: NoiseScoreFn,
    image: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float,
    steps_per_level: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the pixels where ``mask`` is 0 (NCSN §5, Figure 6): annealed Langevin on the unknown part,
    with the known part (mask 1) set to the image perturbed by that level's noise, y + σ_i z."""
    noise_schedule(sigmas)
    positive("eps", eps)
    positive_int("steps_per_level", steps_per_level)
    try:
        mask = torch.broadcast_to(mask.to(image.dtype), image.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to image shape {tuple(image.shape)}") from None
    sigma_min = sigmas[-1].item()
    unknown = _draw(torch.rand, image.shape, image, generator)
    x = mask * image + (1 - mask) * unknown
    for sigma in sigmas.tolist():
        alpha = eps * sigma**2 / sigma_min**2
        sigma_b = torch.full((image.shape[0],), sigma, dtype=image.dtype, device=image.device)
        known = image + sigma * _noise(image, generator)
        x = mask * known + (1 - mask) * x
        for _ in range(steps_per_level):
            x = x + 0.5 * alpha * score_fn(x, sigma_b) + math.sqrt(alpha) * _noise(x, generator)
            x = mask * known + (1 - mask) * x
    return mask * image + (1 - mask) * x


def sample_images(
    score_fn: NoiseScoreFn,
    shape: tuple[int, ...],
    schedule: Schedule,
    trajectory_every: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> AnnealedLangevinResult:
    """Images from Algorithm 1 with ``schedule``'s σ levels, ε, T and final denoising step, started at uniform noise in
    [0, 1] (NCSN §5), clamped to [0, 1] at the end. The noise is drawn on ``generator``'s device (a CPU generator
    reproduces CPU samples on a GPU, at a cost)."""
    if schedule.eps is None or schedule.steps_per_level is None:
        raise ValueError(f"schedule must give eps and steps_per_level to sample with, got {schedule.eps!r} and {schedule.steps_per_level!r}")
    x = _draw(torch.rand, shape, torch.empty(0, device=device), generator)
    result = annealed_langevin_dynamics(score_fn, x, schedule.tensor().to(device), schedule.eps, schedule.steps_per_level,
                                        denoise=schedule.denoise, trajectory_every=trajectory_every, generator=generator)
    result.samples = result.samples.clamp(0, 1)
    return result

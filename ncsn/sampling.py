"""Samplers of a noise-conditional score model: Langevin and annealed Langevin dynamics (NCSN Algorithm 1), inpainting,
predictor–corrector (score_sde) and EDM's Euler / Heun solvers of the probability-flow ODE; each counts its network
evaluations (NFE)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ncsn._checks import non_negative, non_negative_int, noise_schedule, positive, positive_int
from ncsn.sigmas import Schedule, geometric_sigmas

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
NoiseScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _draw(fn, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``fn`` (torch.randn or torch.rand) drawn on the generator's device, then moved to ``like``'s: a CPU generator
    gives the same numbers whether the chain runs on the CPU or a GPU."""
    device = generator.device if generator is not None else like.device
    return fn(shape, dtype=like.dtype, device=device, generator=generator).to(like.device, non_blocking=True)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return _draw(torch.randn, x.shape, x, generator)


def _batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """σ once per image of ``x``, as the score function takes it."""
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


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
class SamplerResult:
    """Final samples, the network evaluations per image it took, and, when asked for, snapshots of the chain (the
    paper's Figure 4)."""

    samples: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)
    nfe: int = 0


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
) -> SamplerResult:
    """NCSN Algorithm 1: T Langevin steps at each σ_i with α_i = ε σ_i²/σ_L², from σ_1 down to σ_L.

    ``denoise`` adds the final step x + σ_L² s(x, σ_L) (Tweedie; NCSNv2 §4); ``trajectory_every`` k
    keeps a copy of x every k steps, plus the start and the end. Each step's z comes from ``generator`` through a stream
    of its own, keyed by the steps left (_StepNoise): samplers that end alike share their last steps' noise.
    """
    noise_schedule(sigmas)
    positive("eps", eps)
    positive_int("steps_per_level", steps_per_level)
    sigma_min = sigmas[-1].item()
    noise, total, path = _StepNoise(generator, x), len(sigmas) * steps_per_level, _Trajectory(trajectory_every, x)
    for sigma in sigmas.tolist():
        alpha = eps * sigma**2 / sigma_min**2
        sigma_b = _batch(sigma, x)
        for _ in range(steps_per_level):
            x = x + 0.5 * alpha * score_fn(x, sigma_b) + math.sqrt(alpha) * noise(x, total - path.steps)
            path.step(x)
    if denoise:
        x = x + sigma_min**2 * score_fn(x, _batch(sigma_min, x))
        path.step(x)
    return SamplerResult(x, path.end(x), total + int(denoise))


def rho_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … N−1 (EDM eq. 5), float32."""
    positive_int("n", n)
    positive("rho", rho)
    if n == 1:
        return torch.tensor([float(sigma_max)])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))).pow(rho).float()


def sampler_grid(schedule: Schedule, levels_only: bool = False) -> torch.Tensor:
    """The σ levels ``schedule``'s sampler walks, float32: the schedule's own for als (and for pc, euler, heun without
    ``steps``), else N geometric levels (pc) or N by EDM's ρ rule (euler, heun) from σ_1 to σ_L. ``levels_only`` (a model
    trained on its levels alone, arch ncsn): each snapped to the nearest level in log σ, repeats dropped."""
    sampler, levels = schedule.sampler, schedule.tensor()
    if sampler.name == "als" or sampler.steps is None:
        return levels
    sigma_max, sigma_min = schedule.sigmas[0], schedule.sigmas[-1]
    if sampler.steps > 1 and sigma_min >= sigma_max:
        raise ValueError(f"sampler steps = {sampler.steps} needs a schedule of more than one σ, got {list(schedule.sigmas)}")
    grid = (geometric_sigmas(sigma_max, sigma_min, sampler.steps) if sampler.name == "pc"
            else rho_sigmas(sigma_max, sigma_min, sampler.steps, sampler.rho))
    if not levels_only:
        return grid
    if sampler.churn > 0:
        raise ValueError("churn evaluates the model between its levels; a model trained on its levels alone (arch ncsn) cannot")
    nearest = (grid.log()[:, None] - levels.log()[None]).abs().argmin(1)
    return levels[torch.unique_consecutive(nearest)]


def nfe(schedule: Schedule, levels_only: bool = False) -> int:
    """Network evaluations per image of ``schedule``'s sampler: L·T (+1 denoising) for als, N(M+1) for pc, N for euler,
    2N − 1 for heun (its last step, to σ = 0, is an Euler step)."""
    sampler, n = schedule.sampler, len(sampler_grid(schedule, levels_only))
    if sampler.name == "als":
        return n * int(schedule.steps_per_level or 0) + int(schedule.denoise)
    return {"pc": n * (sampler.corrector_steps + 1), "euler": n, "heun": 2 * n - 1}[sampler.name]


def chain_steps(schedule: Schedule, levels_only: bool = False) -> int:
    """The steps one chain of ``schedule``'s sampler takes, what ``trajectory_every`` counts: L·T (+1 denoising) for
    als, one per σ of the grid for the others."""
    return nfe(schedule, levels_only) if schedule.sampler.name == "als" else len(sampler_grid(schedule, levels_only))


class _Trajectory:
    """Copies of x every ``every`` steps, plus the start and the end."""

    def __init__(self, every: int | None, x: torch.Tensor):
        if every is not None:
            positive_int("trajectory_every", every)
        self.every, self.steps, self.frames = every, 0, [x.clone()] if every else []

    def step(self, x: torch.Tensor) -> None:
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            self.frames.append(x.clone())

    def end(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.every and self.steps % self.every != 0:
            self.frames.append(x.clone())
        return self.frames


def langevin_corrector_step(score: torch.Tensor, z: torch.Tensor, snr: float) -> torch.Tensor:
    """ε = 2 (r ‖z‖ / ‖s‖)², per image (score_sde's Langevin corrector, which takes the norms' batch mean: per image, an
    image does not depend on the others in its chunk)."""
    grad_norm = score.flatten(1).norm(dim=1).clamp_min(torch.finfo(score.dtype).tiny)
    return 2 * (snr * z.flatten(1).norm(dim=1) / grad_norm) ** 2


@torch.no_grad()
def predictor_corrector(
    score_fn: NoiseScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    corrector_steps: int = 1,
    snr: float = 0.16,
    denoise: bool = True,
    trajectory_every: int | None = None,
    generator: torch.Generator | None = None,
) -> SamplerResult:
    """Predictor–corrector sampling of the VE SDE (score_sde Algorithm 2): at each σ_i, M Langevin corrector steps
    x + ε s + √(2ε) z with the snr rule's ε, then the reverse-diffusion predictor to σ_{i+1} (σ_{N+1} = 0),
    x + (σ_i² − σ_{i+1}²) s + √(σ_i² − σ_{i+1}²) z. ``denoise`` returns the last predictor's mean (no noise added)."""
    noise_schedule(sigmas)
    positive("snr", snr)
    non_negative_int("corrector_steps", corrector_steps)
    levels = sigmas.tolist()
    noise, left = _StepNoise(generator, x), len(levels) * (corrector_steps + 1)
    path = _Trajectory(trajectory_every, x)
    for i, sigma in enumerate(levels):
        sigma_b = _batch(sigma, x)
        for _ in range(corrector_steps):
            score, z = score_fn(x, sigma_b), noise(x, left)
            step = langevin_corrector_step(score, z, snr).view(-1, *[1] * (x.dim() - 1))
            x, left = x + step * score + (2 * step).sqrt() * z, left - 1
        last = i + 1 == len(levels)
        drop = sigma**2 - (0.0 if last else levels[i + 1] ** 2)
        x = x + drop * score_fn(x, sigma_b)
        if not (last and denoise):
            x = x + math.sqrt(drop) * noise(x, left)
        left -= 1
        path.step(x)
    return SamplerResult(x, path.end(x), len(levels) * (corrector_steps + 1))


@torch.no_grad()
def edm_sampler(
    score_fn: NoiseScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    heun: bool = True,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
    trajectory_every: int | None = None,
    generator: torch.Generator | None = None,
) -> SamplerResult:
    """EDM's solver of the probability-flow ODE dx/dσ = −σ ∇log p_σ(x) with σ(t) = t (Karras et al. 2022, Algorithms 1
    and 2) from σ_0 over ``sigmas`` to σ = 0: Euler steps, with Heun's 2nd-order correction unless the step ends at 0;
    churn > 0 first raises each σ_i in [S_tmin, S_tmax] (None: no upper bound) to σ̂ = (1 + γ)σ_i,
    γ = min(S_churn/N, √2 − 1), adding √(σ̂² − σ_i²) S_noise z."""
    noise_schedule(sigmas)
    non_negative("churn", churn)
    non_negative("s_tmin", s_tmin)
    positive("s_noise", s_noise)
    levels = sigmas.tolist()
    gamma = min(churn / len(levels), math.sqrt(2) - 1)
    noise, path, evaluations = _StepNoise(generator, x), _Trajectory(trajectory_every, x), 0
    for i, (t_cur, t_next) in enumerate(zip(levels, levels[1:] + [0.0])):
        churned = gamma > 0 and s_tmin <= t_cur and (s_tmax is None or t_cur <= s_tmax)  # EDM Algorithm 2, line 4
        t_hat = t_cur * (1 + gamma) if churned else t_cur
        if churned:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noise(x, len(levels) - i)
        d = -t_hat * score_fn(x, _batch(t_hat, x))  # (x − D(x; σ̂))/σ̂ with Tweedie's D = x + σ̂² s (EDM eq. 3)
        x_next, evaluations = x + (t_next - t_hat) * d, evaluations + 1
        if heun and t_next > 0:
            d_next = -t_next * score_fn(x_next, _batch(t_next, x_next))
            x_next, evaluations = x + (t_next - t_hat) * 0.5 * (d + d_next), evaluations + 1
        x = x_next
        path.step(x)
    return SamplerResult(x, path.end(x), evaluations)


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
        sigma_b = _batch(sigma, image)
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
    levels_only: bool = False,
) -> SamplerResult:
    """Images from ``schedule``'s sampler, clamped to [0, 1] at the end. Algorithm 1 starts at uniform noise in [0, 1]
    (NCSN §5); the others at that draw plus N(0, σ_1² I), uniform data perturbed at their first level. The noise is drawn
    on ``generator``'s device (a CPU generator reproduces CPU samples on a GPU, at a cost). ``levels_only``: the model
    takes its trained levels alone (arch ncsn)."""
    sampler = schedule.sampler
    if sampler.name == "als" and (schedule.eps is None or schedule.steps_per_level is None):
        raise ValueError(f"schedule must give eps and steps_per_level to sample with, got {schedule.eps!r} and {schedule.steps_per_level!r}")
    x = _draw(torch.rand, shape, torch.empty(0, device=device), generator)
    if sampler.name == "als":
        result = annealed_langevin_dynamics(score_fn, x, schedule.tensor().to(device), schedule.eps, schedule.steps_per_level,
                                            denoise=schedule.denoise, trajectory_every=trajectory_every, generator=generator)
    else:
        grid = sampler_grid(schedule, levels_only).to(device)
        x = x + grid[0] * _noise(x, generator)
        if sampler.name == "pc":
            result = predictor_corrector(score_fn, x, grid, sampler.corrector_steps, sampler.snr, schedule.denoise,
                                         trajectory_every, generator)
        else:
            result = edm_sampler(score_fn, x, grid, sampler.name == "heun", sampler.churn, sampler.s_tmin, sampler.s_tmax,
                                 sampler.s_noise, trajectory_every, generator)
    result.samples = result.samples.clamp(0, 1)
    return result

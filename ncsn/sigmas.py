"""Noise schedules: the geometric σ sequence of NCSN and NCSNv2's rules for choosing it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ncsn._checks import non_negative, non_negative_int, positive, positive_int


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """σ_1 > … > σ_L with constant ratio σ_i/σ_{i+1} (NCSN §4.2), as a float32 tensor."""
    positive("sigma_max", sigma_max)
    positive("sigma_min", sigma_min)
    positive_int("num_levels", num_levels)
    if num_levels == 1:
        if sigma_min != sigma_max:
            raise ValueError(
                f"num_levels=1 needs sigma_min == sigma_max, got sigma_max={sigma_max}, sigma_min={sigma_min}"
            )
        return torch.tensor([float(sigma_max)])
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")
    exponents = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    return exponents.exp().float()


def max_pairwise_distance(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 4096, rank: int = 64) -> float:
    """Exact largest Euclidean distance between a row of ``a`` (N, ...) and a row of ``b`` (M, ...), or between two
    rows of ``a`` when ``b`` is None (NCSNv2 technique 1's σ_1): a start from a few exact distances, then a scan of every
    pair with an upper bound (``bound_factors``) that computes exactly only the pairs it cannot rule out."""
    positive_int("chunk", chunk)
    fa = a.reshape(a.shape[0], -1)
    fb = fa if b is None else b.reshape(b.shape[0], -1)
    if b is None and fa.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 samples, got {fa.shape[0]}")
    if fa.shape[1] != fb.shape[1] or fb.shape[0] < 1:
        raise ValueError(f"a and b must be non-empty with rows of one size, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    mean, basis = principal_basis(torch.cat([fa[:: max(1, fa.shape[0] // 256)], fb[:: max(1, fb.shape[0] // 256)]]), rank)
    factors_a = bound_factors(fa, mean, basis, chunk)
    factors_b = factors_a if b is None else bound_factors(fb, mean, basis, chunk)
    scale = max(factors_a[0][:, -2].max().item(), factors_b[0][:, -2].max().item())
    x = fa[int(factors_a[0][:, -2].argmax())]  # the row farthest from the mean, its farthest, and that one's farthest
    y = fb[farthest(fb, x, chunk)[0]]
    x = fa[farthest(fa, y, chunk)[0]]
    best = scan_pairs(fa, factors_a, fb, factors_b, squared_distance(x, y), scale, same=b is None, chunk=chunk)
    return math.sqrt(best)


def principal_basis(sample: torch.Tensor, rank: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and an orthonormal basis (D, ≤ ``rank``) of the leading directions of ``sample``'s rows, float64. Any
    orthonormal basis makes ``bound_factors`` an upper bound; one that holds most of the data's spread makes it tight."""
    positive_int("rank", rank)
    rows = sample.reshape(sample.shape[0], -1).double()
    mean = rows.mean(0)
    centred = rows - mean
    top = torch.linalg.eigh(centred @ centred.T)[1][:, -rank:]  # from the Gram matrix: cheap for a few hundred rows
    return mean, torch.linalg.qr(centred.T @ top)[0]


def bound_factors(rows: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors L, R (float32, N × (k+3)) with L_x · R_y = ‖p_x − p_y‖² + (r_x + r_y)² ≥ ‖x − y‖², where p are the
    coordinates of x − mean on ``basis`` and r the norm of the rest (orthogonal to the basis, so the bound holds);
    L[:, -2] is ‖x − mean‖²."""
    left, right = [], []
    for i in range(0, rows.shape[0], chunk):
        x = rows[i : i + chunk].reshape(min(chunk, rows.shape[0] - i), -1).double() - mean
        p = x @ basis
        norm = x.pow(2).sum(1, keepdim=True)
        r = (norm - p.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()
        one = torch.ones_like(r)
        left.append(torch.cat([p, r, norm, one], 1).float())
        right.append(torch.cat([-2 * p, 2 * r, one, norm], 1).float())
    return torch.cat(left), torch.cat(right)


def farthest(rows: torch.Tensor, x: torch.Tensor, chunk: int = 4096) -> tuple[int, float]:
    """The index of the row of ``rows`` farthest from ``x`` and its squared distance (ranked in float32)."""
    dist = torch.cat([(rows[i : i + chunk].reshape(min(chunk, rows.shape[0] - i), -1).float() - x.reshape(-1).float()).pow(2).sum(1)
                      for i in range(0, rows.shape[0], chunk)])
    index = int(dist.argmax())
    return index, dist[index].item()


def squared_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖², in float64."""
    return (x.reshape(-1).double() - y.reshape(-1).double()).pow(2).sum().item()


def scan_pairs(a: torch.Tensor, factors_a: tuple[torch.Tensor, torch.Tensor], b: torch.Tensor, factors_b: tuple[torch.Tensor, torch.Tensor],
               best: float, scale: float, same: bool = False, chunk: int = 4096) -> float:
    """The largest squared distance between a row of ``a`` and one of ``b`` (pairs of one set when ``same``), or ``best``
    (an exact squared distance found before) if none is larger. Blocks of pairs are ruled out by the bound (float32, with
    a margin of 1e-4 × ``scale``, the largest squared norm about the mean, far above its rounding); the pairs it leaves
    are computed in float64, or, where it rules out little, the block is ranked as one float32 GEMM."""
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    margin = 1e-4 * scale
    for i in range(0, fa.shape[0], chunk):
        for j in range(i if same else 0, fb.shape[0], chunk):  # for one set, blocks j ≥ i cover every pair
            left = factors_a[0][i : i + chunk] @ factors_b[1][j : j + chunk].T > best - margin
            count = int(left.sum())
            if count == 0:
                continue
            if 64 * count > left.numel():  # the bound rules out little here (noise-like data)
                x, y = fa[i : i + chunk].float(), fb[j : j + chunk].float()
                sq = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None] - 2 * x @ y.T
                flat = int(sq.argmax())
                p, q = i + flat // sq.shape[1], j + flat % sq.shape[1]
            else:
                candidates = torch.nonzero(left)
                sq = torch.cat([(fa[i + c[:, 0]].double() - fb[j + c[:, 1]].double()).pow(2).sum(1) for c in candidates.split(4096)])
                k = int(sq.argmax())
                p, q = i + int(candidates[k, 0]), j + int(candidates[k, 1])
            best = max(best, squared_distance(fa[p], fb[q]))
    return best


SAMPLERS = ("als", "pc", "euler", "heun")


@dataclass(frozen=True)
class Sampler:
    """Which sampler draws images and its own settings (Algorithm 1's ε and T stay on the Schedule).

    name: als (annealed Langevin, NCSN Algorithm 1), pc (predictor–corrector, score_sde), euler or heun (EDM's
    probability-flow ODE solvers; heun with churn > 0 is EDM Algorithm 2). steps: the σ grid's size N for pc (geometric)
    and euler/heun (EDM's ρ rule), between the model's σ_1 and σ_L; None: the model's own levels. corrector_steps, snr:
    pc's Langevin corrector steps per level and their target signal-to-noise ratio. rho, churn: EDM's grid exponent and
    S_churn; s_tmin, s_tmax, s_noise: Algorithm 2's σ range that churns (s_tmax None: no upper bound) and its noise scale.
    """

    name: str = "als"
    steps: int | None = None
    corrector_steps: int = 1
    snr: float = 0.16
    rho: float = 7.0
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.name!r}")
        if self.steps is not None:
            positive_int("sampler steps", self.steps)
            if self.name == "als":
                raise ValueError("sampler steps: annealed Langevin walks the schedule's levels (set sigmas or start_level instead)")
        non_negative_int("corrector_steps", self.corrector_steps)
        positive("snr", self.snr)
        positive("rho", self.rho)
        non_negative("churn", self.churn)
        if self.churn > 0 and self.name != "heun":
            raise ValueError(f"churn is EDM Algorithm 2's (sampler heun), not {self.name}'s")
        non_negative("s_tmin", self.s_tmin)
        positive("s_noise", self.s_noise)
        if self.s_tmax is not None and not positive("s_tmax", self.s_tmax) > self.s_tmin:
            raise ValueError(f"s_tmax must be above s_tmin = {self.s_tmin:g} (or None, no upper bound), got {self.s_tmax!r}")
        shaped = [k for k in ("s_tmin", "s_tmax", "s_noise") if getattr(self, k) != getattr(Sampler, k)]
        if shaped and self.churn == 0:
            raise ValueError(f"{', '.join(shaped)} shape EDM Algorithm 2's churn, which is 0 here: set churn > 0 (sampler heun)")

    def text(self) -> str:
        """A compact form ``parse`` reads back, naming the settings this sampler uses that differ from their defaults:
        als, pc:N=21,M=0, heun:N=11,churn=40,s_noise=1.007, …"""
        used = {"pc": ("steps", "corrector_steps", "snr"), "euler": ("steps", "rho"),
                "heun": ("steps", "rho", "churn", "s_tmin", "s_tmax", "s_noise")}.get(self.name, ())
        short = {"steps": "N", "corrector_steps": "M"}
        parts = [f"{short.get(k, k)}={getattr(self, k):.12g}" for k in used if getattr(self, k) is not None and getattr(self, k) != getattr(Sampler, k)]
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """The sampler ``text`` (as ``text()`` writes it) names."""
        name, _, rest = text.partition(":")
        long = {"N": "steps", "M": "corrector_steps"}
        settings = {}
        for part in filter(None, rest.split(",")):
            key, _, value = part.partition("=")
            key = long.get(key, key)
            if key not in ("steps", "corrector_steps", "snr", "rho", "churn", "s_tmin", "s_tmax", "s_noise") or not value:
                raise ValueError(f"sampler {text!r}: {part!r} is not one of N=, M=, snr=, rho=, churn=, s_tmin=, s_tmax=, s_noise=")
            settings[key] = int(value) if key in ("steps", "corrector_steps") else float(value)
        return cls(name, **settings)


@dataclass(frozen=True)
class Schedule:
    """σ_1 > … > σ_L and the settings a model samples with unless told otherwise: the sampler, Algorithm 1's step ε and
    T steps per level, and the final denoising step. Resolved once, on the driver; stored in every checkpoint."""

    sigmas: tuple[float, ...]
    eps: float | None = None
    steps_per_level: int | None = None
    denoise: bool = True
    sampler: Sampler = Sampler()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in torch.as_tensor(self.sigmas).reshape(-1).tolist()))

    def tensor(self) -> torch.Tensor:
        """The σ levels as a float32 tensor (as the model's buffer holds them)."""
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def from_level(self, start_level: int, eps: float, steps_per_level: int) -> Schedule:
        """The same model's sampler over the levels from ``start_level`` on, with step ε and T steps per level."""
        return Schedule(self.sigmas[start_level:], eps, steps_per_level, self.denoise, self.sampler)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def gamma_for_dimension(dim: int, target: float = 0.5) -> float:
    """NCSNv2 technique 2: γ with Φ(√(2D)(γ−1)+3γ) − Φ(√(2D)(γ−1)−3γ) = target, by bisection."""
    positive_int("dim", dim)

    def overlap(gamma: float) -> float:
        a = math.sqrt(2 * dim) * (gamma - 1)
        return _normal_cdf(a + 3 * gamma) - _normal_cdf(a - 3 * gamma)

    lo, hi = 1.0 + 1e-9, 1.0 + 1.0
    while overlap(hi) > target:  # overlap falls from ~1 at γ=1 towards 0 as γ grows
        hi = 1.0 + 2 * (hi - 1.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overlap(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def langevin_variance_ratio(eps: float, gamma: float, sigma_min: float, steps_per_level: int) -> float:
    """Var(x_T)/σ_i² after T steps of Algorithm 1 at level i, started from N(0, γ²σ_i²) on a point mass.

    With α_i = ε σ_i²/σ_L² and the update x ← x + α/2 ∇log q + √α z, one step maps the variance v to
    a²v + α with a = 1 − r/2, r = ε/σ_L²; so v_T/σ_i² = a^{2T}(γ² − c) + c with c = 1/(1 − r/4)
    (NCSNv2 technique 4, rewritten for NCSN's α/2 step convention).
    """
    r = eps / sigma_min**2
    a = 1.0 - r / 2.0
    c = 1.0 / (1.0 - r / 4.0)
    return a ** (2 * steps_per_level) * (gamma**2 - c) + c


def step_size_for(gamma: float, sigma_min: float, steps_per_level: int) -> float:
    """NCSNv2 technique 4: the ε (Algorithm 1's step) that brings the variance ratio closest to 1."""
    positive("gamma", gamma)
    positive("sigma_min", sigma_min)
    positive_int("steps_per_level", steps_per_level)
    # r = ε/σ_L² must stay in (0, 2) for the recursion to contract; search log-spaced, then refine.
    candidates = torch.logspace(-8, math.log10(1.99), 4000, dtype=torch.float64).tolist()
    best = min(candidates, key=lambda r: abs(langevin_variance_ratio(r * sigma_min**2, gamma, sigma_min, steps_per_level) - 1))
    lo, hi = best / 1.01, min(best * 1.01, 1.999)
    for _ in range(100):  # golden-section on |ratio − 1| around the grid optimum
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        f1 = abs(langevin_variance_ratio(m1 * sigma_min**2, gamma, sigma_min, steps_per_level) - 1)
        f2 = abs(langevin_variance_ratio(m2 * sigma_min**2, gamma, sigma_min, steps_per_level) - 1)
        lo, hi = (lo, m2) if f1 < f2 else (m1, hi)
    return 0.5 * (lo + hi) * sigma_min**2


@dataclass(frozen=True)
class ScheduleRecommendation:
    """A noise schedule and sampler setting chosen by NCSNv2's rules (Song & Ermon 2020).

    sigma_max: σ_1, the largest pairwise Euclidean distance in the data (technique 1).
    sigma_min: σ_L, the smallest noise level (given; 0.01 for images in [0, 1] as in NCSNv2).
    num_levels: L, the fewest geometric levels whose ratio does not exceed the technique-2 γ.
    gamma: the ratio σ_i/σ_{i+1} of the resulting geometric schedule (≤ gamma_target).
    gamma_target: γ solving the Gaussian-CDF overlap condition for dimension ``dim`` (technique 2).
    eps: Algorithm 1's step ε for which Langevin at each level ends at the level's variance (technique 4).
    steps_per_level: T, the Langevin steps per level the step size was chosen for.
    dim: D, the data dimension (C·H·W for images).
    variance_ratio: Var(x_T)/σ_i² that ε achieves; 1 is the technique-4 target.
    """

    sigma_max: float
    sigma_min: float
    num_levels: int
    gamma: float
    gamma_target: float
    eps: float
    steps_per_level: int
    dim: int
    variance_ratio: float

    def schedule(self, denoise: bool = True) -> Schedule:
        """The recommendation as the Schedule a model samples with."""
        return Schedule(self.sigmas(), self.eps, self.steps_per_level, denoise)

    def sigmas(self) -> torch.Tensor:
        """The recommended σ sequence."""
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.num_levels)


def recommend_schedule(
    data: torch.Tensor | None,
    steps_per_level: int,
    sigma_min: float = 0.01,
    *,
    sigma_max: float | None = None,
    dim: int | None = None,
) -> ScheduleRecommendation:
    """Apply NCSNv2 techniques 1, 2 and 4 to ``data`` (N, ...) or to a known ``sigma_max`` and ``dim``."""
    positive_int("steps_per_level", steps_per_level)
    positive("sigma_min", sigma_min)
    if data is not None:
        dim = int(data[0].numel())
        sigma_max = max_pairwise_distance(data)
    if sigma_max is None or dim is None:
        raise ValueError("recommend_schedule needs data, or both sigma_max and dim")
    positive("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max:.4g}) of the data")
    gamma_target = gamma_for_dimension(dim)
    num_levels = math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma_target)) + 1
    gamma = (sigma_max / sigma_min) ** (1.0 / (num_levels - 1))
    eps = step_size_for(gamma, sigma_min, steps_per_level)
    return ScheduleRecommendation(
        sigma_max=float(sigma_max),
        sigma_min=float(sigma_min),
        num_levels=num_levels,
        gamma=gamma,
        gamma_target=gamma_target,
        eps=eps,
        steps_per_level=steps_per_level,
        dim=dim,
        variance_ratio=langevin_variance_ratio(eps, gamma, sigma_min, steps_per_level),
    )

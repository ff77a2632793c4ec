"""The search space of a tuning job: NCSNv2's recommended point for the data set, the ranges around it, and a trial's
point applied to a config."""
from __future__ import annotations

import math

from ray import tune

from pipelines.config import Config, ConfigError
from pipelines.train import resolve_schedule

PARAMS = ("sigma_max", "sigma_min", "num_levels", "eps", "steps_per_level")  # a schedule trial's point


def recommended_point(cfg: Config, manifest: dict) -> dict:
    """NCSNv2's recommended schedule and ε for the data set (from the shard statistics), as a trial config."""
    schedule = resolve_schedule(cfg.evolve({"schedule.recommend": True}), manifest)
    sigmas, eps = schedule.sigmas, schedule.eps
    def round6(x) -> float:  # the schedule is float32; keep the YAML free of float32 digits
        return float(f"{float(x):.6g}")
    return {"sigma_max": round6(sigmas[0]), "sigma_min": round6(sigmas[-1]), "num_levels": len(sigmas), "eps": round6(eps),
            "steps_per_level": cfg.sampling.steps_per_level}


def search_space(cfg: Config, rec: dict) -> dict:
    """Ranges from cfg.tune around the recommended point (widened to contain it)."""
    t = cfg.tune
    lo_min, hi_min = min(t.sigma_min[0], rec["sigma_min"]), max(t.sigma_min[1], rec["sigma_min"])
    levels = (max(2, math.floor(rec["num_levels"] * t.num_levels_scale[0])), max(2, math.ceil(rec["num_levels"] * t.num_levels_scale[1])))
    return {
        "sigma_max": _log_uniform(rec["sigma_max"] * t.sigma_max_scale[0], rec["sigma_max"] * t.sigma_max_scale[1]),
        "sigma_min": _log_uniform(lo_min, hi_min),
        "num_levels": tune.randint(min(levels[0], rec["num_levels"]), max(levels[1], rec["num_levels"]) + 1),
        **sampler_space(cfg, rec),
    }


def _log_uniform(low: float, high: float):
    """Log-uniform over [low, high], the upper end included (the recommended point may lie on it)."""
    return tune.loguniform(low, high * (1 + 1e-9))


def sampler_space(cfg: Config, rec: dict) -> dict:
    """ε (× the recommended one) and T (the listed choices and the recommended one): searched in both modes."""
    return {"eps": _log_uniform(rec["eps"] * cfg.tune.eps_scale[0], rec["eps"] * cfg.tune.eps_scale[1]),
            "steps_per_level": tune.choice(sorted(set(cfg.tune.steps_per_level) | {rec["steps_per_level"]}))}


def apply_point(cfg: Config, point: dict) -> Config:
    """A copy of ``cfg`` with a trial's schedule and sampler settings (the schedule then fixed, not recommended)."""
    if point["sigma_min"] >= point["sigma_max"]:
        raise ConfigError(f"trial σ_min {point['sigma_min']:.4g} >= σ_max {point['sigma_max']:.4g}; narrow tune.sigma_min")
    return cfg.evolve({"schedule.recommend": False, "schedule.sigma_max": float(point["sigma_max"]),
                       "schedule.sigma_min": float(point["sigma_min"]), "schedule.num_levels": int(point["num_levels"]),
                       "sampling.eps": float(point["eps"]), "sampling.steps_per_level": int(point["steps_per_level"])})


def label_of(point: dict, rec: dict) -> str:
    """"recommended" for the recommended point, else "search"."""
    return "recommended" if all(point.get(k) == v for k, v in rec.items()) else "search"


def check_space(cfg: Config, rec: dict) -> None:
    """A ConfigError, before Tune starts, when no searched point can be valid: every σ_max the space allows is at or below
    every σ_min it allows (each trial would fail; only `recommended` would train, and be called the best)."""
    t = cfg.tune
    highest_max, lowest_min = rec["sigma_max"] * t.sigma_max_scale[1], min(t.sigma_min[0], rec["sigma_min"])
    if highest_max <= lowest_min:
        raise ConfigError(f"tune.sigma_max_scale {t.sigma_max_scale} × the recommended σ_1 {rec['sigma_max']:.4g} allows σ_max up to "
                          f"{highest_max:.4g}, not above the smallest σ_min of tune.sigma_min ({lowest_min:.4g}): no searched trial "
                          "could train; widen tune.sigma_max_scale or lower tune.sigma_min", "tune.sigma_max_scale")

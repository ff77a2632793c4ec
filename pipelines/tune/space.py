"""The search space of a tuning job: NCSNv2's recommended point for the data set, the ranges around it, and a trial's
point applied to a config."""
from __future__ import annotations

import math
from dataclasses import replace

from ray import tune

from ncsn.sampling import nfe
from ncsn.sigmas import Sampler, Schedule
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


def sampler_settings(cfg: Config, schedule: Schedule, levels_only: bool, recommended: str) -> list[str]:
    """Sampler-only tuning's sampler choices, each as a setting text (Sampler.text(), with ":T=t" for als): als over the
    T of tune.steps_per_level, pc (M = 0, 1), euler and heun over tune.sampler_steps (heun also over tune.churn, churn > 0
    only where the model takes any σ, and then over tune.s_noise), those of tune.samplers within
    tune.max_nfe evaluations per image (als counted on all levels); the checkpoint's own (``recommended``, the reference)
    always. A ConfigError when the budget or the model leaves nothing to search."""
    t, found = cfg.tune, []
    for name in t.samplers:
        if name == "als":
            found += [f"als:T={steps}" for steps in sorted(set(t.steps_per_level))]
            continue
        churns = sorted({c for c in t.churn if not (levels_only and c > 0)}) if name == "heun" else [0.0]
        for n in sorted(set(t.sampler_steps)):
            for m in (0, 1) if name == "pc" else (1,):
                found += [Sampler(name, steps=n, corrector_steps=m, churn=c, s_noise=s).text()
                          for c in churns for s in (sorted(set(t.s_noise)) if c > 0 else [1.0])]
    if not found:
        raise ConfigError(f"tune.churn {t.churn} leaves heun, the only one of tune.samplers, nothing to search: a model trained on "
                          "its levels alone (arch ncsn) takes churn 0 only", "tune.churn")
    within = [s for s in found if t.max_nfe is None or setting_nfe(s, schedule, levels_only) <= t.max_nfe]
    if not within:
        raise ConfigError(f"tune.max_nfe {t.max_nfe} admits none of tune.samplers {t.samplers} (the cheapest takes "
                          f"{min(setting_nfe(s, schedule, levels_only) for s in found)} evaluations per image)", "tune.max_nfe")
    return sorted(set(within) | {recommended}, key=lambda s: (setting_nfe(s, schedule, levels_only), s))


def setting_schedule(setting: str, schedule: Schedule) -> Schedule:
    """``schedule`` sampled with a setting text of ``sampler_settings``."""
    text, _, steps = setting.partition(":T=")
    return replace(schedule, sampler=Sampler.parse(text), steps_per_level=int(steps) if steps else schedule.steps_per_level)


def setting_text(schedule: Schedule) -> str:
    """The setting text of ``schedule``'s sampler (the inverse of ``setting_schedule``)."""
    return schedule.sampler.text() + (f":T={schedule.steps_per_level}" if schedule.sampler.name == "als" else "")


def setting_nfe(setting: str, schedule: Schedule, levels_only: bool) -> int:
    """Network evaluations per image of ``setting`` on ``schedule``'s levels."""
    return nfe(setting_schedule(setting, schedule), levels_only)


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

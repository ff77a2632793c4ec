"""Tuning's verdict, in two stages on two splits.

Selection, on the validation split: the search's best trials and `recommended` are re-scored on fresh sampling seeds and
the finalist chosen. Judgement, on the test split, which nothing earlier in the job looked at: the finalist's schedule
and the recommended one are trained again on fresh training seeds (the same seeds for both, so gaps are paired), every
network is scored on fresh sampling seeds, and the gap's interval comes from the spread between training runs (paired t
with n − 1 df; Bonferroni over finalists when there are several). `recommended`'s networks are also sampled with the
finalist's sampler, which splits the gap into what the sampler bought and what the training schedule bought. Sampler-only
tuning judges its finalist on its one network, with the sampling seed as the unit. The statistics are pure functions
(``select``, ``judge``) that bench/verdict_calibration.py drives on simulated outcomes."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from ncsn.metrics import Estimate
from ncsn.sigmas import Schedule
import ray

from pipelines.sample import load_model, read_checkpoint
from pipelines.tune.objective import ObjectiveSpec, sample_and_score
from pipelines.tune.space import setting_schedule

log = logging.getLogger(__name__)
SEED_BASE = 10_000  # sampling seeds of both stages are SEED_BASE + i: never the search's own evaluation seed
TRAIN_SEED_OFFSET = 1000  # the judgement's training seeds are train.seed + TRAIN_SEED_OFFSET + i: never the search's
ALPHA = 0.05  # the family-wise error of the verdict's intervals


@dataclass(frozen=True)
class Candidate:
    """A trial's schedule and sampler: its search objective, its final checkpoint and the sampler settings it was scored
    with (the levels from ``start_level`` on, ε, T, and in sampler-only tuning the sampler setting; "": the checkpoint's)."""

    trial_id: str
    label: str  # recommended | search
    search_objective: float
    checkpoint: str
    start_level: int
    eps: float
    steps_per_level: int
    sampler: str = ""

    def same_sampler(self, other: Candidate) -> bool:
        return ((self.start_level, self.eps, self.steps_per_level, self.sampler)
                == (other.start_level, other.eps, other.steps_per_level, other.sampler))

    def schedule(self, trained: Schedule) -> Schedule:
        """The trained checkpoint's schedule as this candidate samples it."""
        base = setting_schedule(self.sampler, trained) if self.sampler else trained
        return base.from_level(self.start_level, self.eps, self.steps_per_level)


@dataclass(frozen=True)
class Ranked:
    """A candidate's selection scores (one per sampling seed, on the validation split) and their mean with a t interval."""

    candidate: Candidate
    scores: tuple[float, ...]
    mean: Estimate


@dataclass(frozen=True)
class Judgement:
    """A finalist against `recommended` on the test split, over ``units`` replicates (training runs, or sampling seeds of
    one network), each the mean of ``repeats`` sampling seeds. Intervals at ``level`` (Bonferroni-adjusted when several
    finalists are judged; the attribution's two parts at 1 − (1 − level)/2)."""

    finalist: str
    unit: str  # "training run" | "sampling seed"
    units: int
    repeats: int
    level: float
    finalist_mean: Estimate
    recommended_mean: Estimate
    gap: Estimate  # finalist − recommended, paired by unit (negative: the finalist is better, the objective being minimised)
    detectable: float  # the smallest |gap| this test finds with 80% power (noncentral t, the df used)
    between_sd: float  # sd of a network's true score between training runs (method of moments; 0 for one network)
    within_sd: float  # sd between sampling seeds of one network
    sampler_part: Estimate | None = None  # recommended's networks: finalist's sampler − their own
    schedule_part: Estimate | None = None  # finalist's networks − recommended's, both with the finalist's sampler

    @property
    def df(self) -> int:
        return self.units - 1

    @property
    def outcome(self) -> str:
        """beat | worse | not distinguishable, by whether the gap's interval excludes 0."""
        return "beat" if self.gap.high < 0 else "worse" if self.gap.low > 0 else "not distinguishable"


def candidates(rows: list[dict], top: int, checkpoint_of) -> list[Candidate]:
    """The ``top`` rows of lowest search objective that left a final checkpoint, and the recommended row;
    ``checkpoint_of(row)`` is that checkpoint's path or URL, or None (a trial ASHA stopped has none)."""
    paths = {r["trial_id"]: checkpoint_of(r) for r in rows if r["objective"] is not None}
    done = sorted((r for r in rows if paths.get(r["trial_id"])), key=lambda r: r["objective"])
    chosen = done[:top] + [r for r in done[top:] if r["label"] == "recommended"]
    return [Candidate(r["trial_id"], r["label"], float(r["objective"]), paths[r["trial_id"]], int(r.get("start_level") or 0),
                      float(r["eps"]), int(r["steps_per_level"]), r.get("sampler") or "") for r in chosen]


def t_interval(values: np.ndarray, level: float = 1 - ALPHA) -> Estimate:
    """Mean of ``values`` ± Student's t quantile (n − 1 df) × standard error."""
    mean = float(np.mean(values))
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return Estimate(mean, mean - half, mean + half)


def detectable_difference(se: float, df: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """The smallest true difference a two-sided t test at ``alpha`` with ``df`` degrees of freedom and standard error
    ``se`` detects with probability ``power`` (noncentral t): about 5.7 se at 2 df, 2.8 se as df grows."""
    if not se > 0:
        return 0.0
    crit = stats.t.ppf(1 - alpha / 2, df)
    def shortfall(effect: float) -> float:
        wrong_side = float(np.nan_to_num(stats.nct.cdf(-crit, df, effect)))  # ≈ 0, but scipy can return NaN out there
        return stats.nct.sf(crit, df, effect) + wrong_side - power
    return float(optimize.brentq(shortfall, 0.0, 10 * crit + 10) * se)


def select(found: list[Candidate], scores: dict[str, list[float]] | None, finalists: int = 1) -> tuple[list[Ranked], list[Candidate]]:
    """Rank the candidates by their mean selection score (validation split, best first; by the search objective when
    ``scores`` is None); the finalists are the ``finalists`` best searched ones, judged against `recommended` whether or
    not they ranked above it here (the test split decides; the selection only chose them)."""
    def ranked(c: Candidate) -> Ranked:
        s = np.asarray(scores[c.trial_id] if scores else [c.search_objective], dtype=float)
        return Ranked(c, tuple(s.tolist()), t_interval(s) if len(s) > 1 else Estimate(float(s[0]), math.nan, math.nan))
    order = sorted((ranked(c) for c in found), key=lambda r: r.mean.value)
    return order, [r.candidate for r in order if r.candidate.label != "recommended"][:finalists]


def judge(finalist: np.ndarray, recommended: np.ndarray, finalist_id: str, unit: str, finalists: int = 1,
          recommended_with_finalists_sampler: np.ndarray | None = None) -> Judgement:
    """The verdict's statistics from scores of shape (units, repeats): row i of ``finalist`` and of ``recommended`` share
    unit i (the same training seed, or the same sampling seed), the columns are sampling seeds. The gap's interval is a
    paired t over units at 1 − ALPHA/``finalists``; ``recommended_with_finalists_sampler`` (recommended's networks sampled
    with the finalist's sampler, same shape) splits the gap into a sampler part and a schedule part."""
    f, r = np.atleast_2d(finalist).astype(float), np.atleast_2d(recommended).astype(float)
    if f.shape != r.shape or f.shape[0] < 2:
        raise ValueError(f"judge needs two score tables of one shape with at least 2 units, got {f.shape} and {r.shape}")
    level = 1 - ALPHA / finalists
    gaps = f.mean(1) - r.mean(1)
    within = float(np.sqrt(np.mean([t.var(1, ddof=1).mean() for t in (f, r)]))) if f.shape[1] > 1 else 0.0
    between = 0.0
    if unit == "training run":  # a network's mean over J seeds varies by between² + within²/J
        between = float(np.sqrt(max(0.0, np.mean([t.mean(1).var(ddof=1) for t in (f, r)]) - within**2 / f.shape[1])))
    parts = {}
    if recommended_with_finalists_sampler is not None:
        a = np.atleast_2d(recommended_with_finalists_sampler).astype(float)
        part_level = 1 - (1 - level) / 2
        parts = {"sampler_part": t_interval(a.mean(1) - r.mean(1), part_level),
                 "schedule_part": t_interval(f.mean(1) - a.mean(1), part_level)}
    se = float(np.std(gaps, ddof=1) / math.sqrt(len(gaps)))
    return Judgement(finalist_id, unit, f.shape[0], f.shape[1], level, t_interval(f.mean(1), level), t_interval(r.mean(1), level),
                     t_interval(gaps, level), detectable_difference(se, len(gaps) - 1, ALPHA / finalists), between, within, **parts)


def verdict(order: list[Ranked], judgements: list[Judgement], metric: str, samples: int, selected: bool = True,
            selection_split: str = "validation", judgement_split: str = "test") -> str:
    """The verdict: its first line the finding, then how it was reached (the selection, the unit, the test and its df, the
    splits), each finalist's means and the test's resolution, the attribution and the variance components."""
    how = f"re-scored on the {selection_split} split" if selected else f"by the search's own evaluation on the {selection_split} split"
    first = order[0].candidate if order else None
    chosen = (f"the selection ({how}) ranked {'the recommended schedule' if first.label == 'recommended' else first.trial_id} "
              f"first ({metric} {order[0].mean})" if first else "no trial left a checkpoint to select on")
    if not judgements:
        return f"{chosen}; not judged on the {judgement_split} split (tune.confirm_train_seeds=0, or no searched trial finished training)"
    lines = []
    for j in judgements:
        gap = f"gap {j.gap} ({j.level:.1%} interval)"
        finding = {"beat": f"it beat the recommended schedule by {-j.gap.value:.4g}, {gap}",
                   "worse": f"it is worse than the recommended schedule by {j.gap.value:.4g}, {gap}",
                   "not distinguishable": f"not distinguishable from the recommended schedule, {gap}: the interval covers 0"}[j.outcome]
        lines.append(f"finalist {j.finalist} (the best searched schedule {how}): {finding}")
    j = judgements[0]
    units = (f"{j.units} training runs per schedule (fresh training seeds, paired across schedules)" if j.unit == "training run"
             else f"{j.units} sampling seeds of one network (a claim about this checkpoint, not about training)")
    adjusted = f", Bonferroni over {len(judgements)} finalists" if len(judgements) > 1 else ""
    lines += [f"  {chosen}",
              f"  judged on the {judgement_split} split over {units}, each the mean of {j.repeats} sampling seed(s) of {samples} "
              f"samples; paired t, {j.df} df{adjusted}"]
    for j in judgements:
        lines.append(f"  {j.finalist}: {metric} {j.finalist_mean} against recommended {j.recommended_mean}; this test detects gaps "
                     f"of {j.detectable:.3g} or more with 80% power")
        if j.sampler_part is not None:
            lines.append(f"  of the gap, the sampler (recommended's networks with the finalist's ε, T) accounts for {j.sampler_part}, "
                         f"the training schedule for {j.schedule_part} ({1 - (1 - j.level) / 2:.2%} intervals: Bonferroni over the two parts)")
        if j.unit == "training run":
            lines.append(f"  variance components: between training runs sd {j.between_sd:.3g}, between sampling seeds of one network "
                         f"sd {j.within_sd:.3g}")
    return "\n".join(lines)


def _score(candidate: Candidate, payload: bytes, seed: int, objective: ObjectiveSpec, num_samples: int, metric: str) -> float:
    """``metric`` of ``num_samples`` samples of the checkpoint in ``payload`` with the candidate's sampler settings, on
    ``seed``, against the objective's reference split."""
    model, ckpt = load_model(payload)
    metrics, _ = sample_and_score(objective.evaluator(), model, candidate.schedule(ckpt.schedule), objective, seed, num_samples)
    return metrics[metric]


def score_all(jobs: list[tuple[str, Candidate]], objective: ObjectiveSpec, metric: str, seeds: int, num_samples: int) -> list[list[float]]:
    """For each (checkpoint, sampler) job, ``metric`` on sampling seeds SEED_BASE + 0 … seeds − 1 (the same seeds for every
    job, so scores pair), as parallel Ray tasks (one CPU each; each checkpoint read once and shipped as bytes)."""
    task = ray.remote(num_cpus=1, max_retries=0)(_score)
    payloads = {path: ray.put(read_checkpoint(path)[1]) for path in dict.fromkeys(path for path, _ in jobs)}
    log.info("scoring %d networks × samplers on %d sampling seeds of %d samples against the %s split", len(jobs), seeds,
             num_samples, objective.reference_split)
    refs = [[task.remote(sampler, payloads[path], SEED_BASE + i, objective, num_samples, metric) for i in range(seeds)]
            for path, sampler in jobs]
    return [ray.get(r) for r in refs]

"""Tuning's confirmation stage: the search's best trials and the `recommended` one, re-evaluated on fresh sampling seeds
(the same seeds for every trial, so differences are paired) at a larger count. The best config is chosen by the
confirmed mean, and the verdict says whether it beat NCSNv2's recommended schedule, with the interval of the gap."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ncsn.metrics import Estimate
from pipelines.objective import ObjectiveSpec, sample_and_score

log = logging.getLogger(__name__)
SEED_BASE = 10_000  # confirmation seeds are SEED_BASE + i: never the search's own evaluation seed


@dataclass(frozen=True)
class Candidate:
    """A trial to confirm: its final checkpoint and the sampler settings it was scored with."""

    trial_id: str
    label: str  # recommended | search
    search_objective: float
    checkpoint: str
    start_level: int
    eps: float
    steps_per_level: int


@dataclass(frozen=True)
class Confirmed:
    """A candidate's objective on each confirmation seed, their mean with a t interval, and (but for `recommended`
    itself) the paired gap to `recommended` (negative: better, the objective being minimised)."""

    candidate: Candidate
    scores: tuple[float, ...]
    mean: Estimate
    vs_recommended: Estimate | None


def candidates(rows: list[dict], top: int, checkpoint_of) -> list[Candidate]:
    """The ``top`` rows of lowest objective that left a final checkpoint, and the recommended row; ``checkpoint_of(row)``
    is that checkpoint's path or URL, or None (a trial ASHA stopped has none)."""
    paths = {r["trial_id"]: checkpoint_of(r) for r in rows if r["objective"] is not None}
    done = sorted((r for r in rows if paths.get(r["trial_id"])), key=lambda r: r["objective"])
    chosen = done[:top] + [r for r in done[top:] if r["label"] == "recommended"]
    return [Candidate(r["trial_id"], r["label"], float(r["objective"]), paths[r["trial_id"]], int(r.get("start_level") or 0),
                      float(r["eps"]), int(r["steps_per_level"])) for r in chosen]


def t_interval(values: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of ``values`` ± Student's t quantile × standard error."""
    from scipy import stats

    mean = float(np.mean(values))
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return Estimate(mean, mean - half, mean + half)


def rank(found: list[Candidate], scores: dict[str, list[float]]) -> list[Confirmed]:
    """The candidates by confirmed mean (best first), each with its paired gap to `recommended` when that was confirmed."""
    rec = next((c for c in found if c.label == "recommended"), None)
    out = []
    for c in found:
        s = np.asarray(scores[c.trial_id], dtype=float)
        gap = t_interval(s - np.asarray(scores[rec.trial_id])) if rec is not None and c is not rec else None
        out.append(Confirmed(c, tuple(s.tolist()), t_interval(s), gap))
    return sorted(out, key=lambda r: r.mean.value)


def verdict(confirmed: list[Confirmed], metric: str) -> str:
    """One line: the confirmed best, and whether it beat the recommended schedule (by how much, with the interval)."""
    best = confirmed[0]
    head = f"confirmed best: {best.candidate.trial_id} ({best.candidate.label}), {metric} {best.mean}"
    if best.candidate.label == "recommended":
        return head + "; no searched schedule beat NCSNv2's recommended one"
    gap = best.vs_recommended
    if gap is None:
        return head + "; the recommended trial left no checkpoint to compare with"
    if gap.high < 0:
        return head + f"; it beat the recommended schedule by {-gap.value:.4g} (95% interval of the gap {gap})"
    return head + f"; not distinguishable from the recommended schedule (gap {gap}, the interval covers 0)"


def _score(candidate: Candidate, payload: bytes, seed: int, objective: ObjectiveSpec, num_samples: int, metric: str) -> float:
    """``metric`` of ``num_samples`` samples of the candidate's checkpoint with its sampler settings, on ``seed``."""
    from pipelines.sample import load_model

    model, ckpt = load_model(payload)
    metrics, _ = sample_and_score(objective.evaluator(), model, ckpt.sigmas[candidate.start_level:], candidate.eps,
                                  candidate.steps_per_level, objective, seed, num_samples)
    return metrics[metric]


def run_confirmation(found: list[Candidate], objective: ObjectiveSpec, metric: str, seeds: int, num_samples: int) -> list[Confirmed]:
    """Score every candidate on every seed as parallel Ray tasks (one CPU each; checkpoints travel as bytes), then rank."""
    import ray

    from pipelines.sample import read_checkpoint

    task = ray.remote(num_cpus=1, max_retries=0)(_score)
    payloads = {c.trial_id: ray.put(read_checkpoint(c.checkpoint)[1]) for c in found}
    log.info("confirmation: %d trials × %d fresh seeds at %d samples", len(found), seeds, num_samples)
    refs = {c.trial_id: [task.remote(c, payloads[c.trial_id], SEED_BASE + i, objective, num_samples, metric) for i in range(seeds)]
            for c in found}
    return rank(found, {trial: ray.get(r) for trial, r in refs.items()})

"""How often the tuning verdict says "beat" when nothing is better, and how often it finds a real improvement: the
project's own selection and judgement (pipelines.tune.verdict.select and .judge) driven on simulated tuning jobs, for the old
design (the search's networks re-sampled on the test split, selected and judged on the same scores, the sampling seed as
the unit) and the new one (search and selection on the validation split; the finalist and `recommended` retrained on
fresh training seeds and judged on the test split, the training run as the unit).

A network's score on a reference split with one sampling seed is q + ρ·r + σ·e: q its true quality (its schedule's
mean, plus its training run's effect: τ_shared·z_seed, common to every schedule trained with that seed — the search's
trials all use train.seed, the judgement pairs its schedules by seed — and τ_own·z of its own), r its interaction with
that reference split (one draw per network and split, shared by every score of that network against it), e the sampling
seed's noise (σ_search at the search's count, σ per seed at the selection's and judgement's). The levels default to those measured on the digits (BENCHMARKS.md says how);
``--measure RUN_DIR`` measures them again from a finished tuning run's judgement networks. Under the null every
schedule has the same mean; the power run plants one searched schedule better by twice the new design's stated
resolution (the smallest gap its test detects with 80% power: noncentral t with n_train − 1 df).

Usage: python bench/verdict_calibration.py [--jobs 1000] [--quick] [--measure runs/digits-tune --shards … ]
The last line: false_beat=<rate> power=<rate> for the new design.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

from pipelines.tune.verdict import Candidate, detectable_difference, judge, select


@dataclass(frozen=True)
class Levels:
    """The noise of a score (KID on the classifier's standardised features), each an sd."""

    train_shared: float  # a training seed's effect, common to the schedules trained with it (τ_shared)
    train_own: float  # a network's own training effect (τ_own): what pairing by seed leaves
    reference: float  # a network's interaction with one reference split (ρ)
    seed: float  # between sampling seeds at the selection's and judgement's count (σ)
    search: float  # one search evaluation at its count (σ_search)


@dataclass(frozen=True)
class Design:
    finished: int = 5  # trials that finish training (`recommended` among them); ASHA stopped the others
    top: int = 3  # searched trials re-scored with `recommended` (tune.select_top)
    seeds: int = 3  # sampling seeds per network (tune.confirm_seeds)
    train_seeds: int = 3  # training runs per schedule in the judgement (tune.confirm_train_seeds)


def _candidates(n: int) -> list[Candidate]:
    return [Candidate("rec" if i == 0 else f"s{i}", "recommended" if i == 0 else "search", 0.0, "", 0, 1.0, 1) for i in range(n)]


def job(rng: np.random.Generator, levels: Levels, design: Design, gap: float, new: bool) -> str:
    """One simulated tuning job's outcome (beat | not distinguishable | worse); searched trial s1 is better by ``gap``."""
    found = _candidates(design.finished)
    truth = {c.trial_id: 0.30 - (gap if c.trial_id == "s1" else 0.0) for c in found}
    shared = levels.train_shared * rng.standard_normal()  # the search's networks: one training seed for every trial
    quality = {t: mu + shared + levels.train_own * rng.standard_normal() for t, mu in truth.items()}
    ref = {t: levels.reference * rng.standard_normal() for t in truth}  # against the split the search scores on
    search = {t: quality[t] + ref[t] + levels.search * rng.standard_normal() for t in truth}
    ranked = sorted((c for c in found if c.label == "search"), key=lambda c: search[c.trial_id])[:design.top] + [found[0]]
    scores = {c.trial_id: quality[c.trial_id] + ref[c.trial_id] + levels.seed * rng.standard_normal(design.seeds) for c in ranked}
    _, finalists = select(ranked, {t: list(s) for t, s in scores.items()})
    f = finalists[0].trial_id
    if not new:  # the same networks and scores judge the choice, over sampling seeds
        return judge(scores[f][:, None], scores["rec"][:, None], f, "sampling seed").outcome
    seeds = levels.train_shared * rng.standard_normal((design.train_seeds, 1))  # retrained on fresh seeds, paired
    fresh = {t: truth[t] + seeds + levels.train_own * rng.standard_normal((design.train_seeds, 1))
             + levels.reference * rng.standard_normal((design.train_seeds, 1))  # each network against the test split
             + levels.seed * rng.standard_normal((design.train_seeds, design.seeds)) for t in (f, "rec")}
    return judge(fresh[f], fresh["rec"], f, "training run").outcome


def resolution(levels: Levels, design: Design) -> float:
    """The new design's stated resolution: the smallest gap its paired t test (n_train − 1 df) detects with 80% power."""
    per_run = levels.train_own**2 + levels.reference**2 + levels.seed**2 / design.seeds  # what pairing by seed leaves
    return detectable_difference(math.sqrt(2 * per_run / design.train_seeds), design.train_seeds - 1)


def measure(run_dir: str, shards: str, samples: int) -> Levels:
    """The levels from a finished tuning job's judgement networks (<run_dir>/tune/trials/judge-<trial>-s<seed>): each
    network sampled on 3 seeds, the same samples scored against the validation and the test split. σ: the pooled sd over
    seeds; ρ² = Var(validation − test score of one network)/2 (the same samples, so their own noise cancels); τ_own² from
    the variance of the gaps paired by seed, 2τ_own² + 2ρ² + 2σ²/3; τ_shared² = the variance between one schedule's runs
    − τ_own² − ρ² − σ²/3 (each clipped at 0); σ_search: the per-seed sd of the first 250 samples (the search's count)."""
    import tempfile
    from pathlib import Path

    import torch

    from ncsn.data import to_stored
    from pipelines.sample import load_model
    from pipelines.tune.objective import ObjectiveSpec, sample_and_score

    torch.set_num_threads(2)
    nets = sorted(Path(run_dir, "tune", "trials").glob("judge-*/model/checkpoint.pt"))
    if not nets:
        raise SystemExit(f"no judgement networks under {run_dir}/tune/trials (judge-*/model/checkpoint.pt)")
    table: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {split: ObjectiveSpec(shards, split, "classifier", tmp, samples, 100, True, 0) for split in ("validation", "test")}
        evaluators = {split: spec.evaluator() for split, spec in specs.items()}
        for path in nets:
            model, ckpt = load_model(str(path))
            schedule = path.parent.parent.name.rsplit("-s", 1)[0]
            row = table.setdefault(path.parent.parent.name, {"schedule": schedule, "validation": [], "test": [], "small": []})
            for seed in range(3):
                _, images = sample_and_score(evaluators["test"], model, ckpt.schedule, specs["test"], 10_000 + seed)
                stored = to_stored(images)
                for split in ("validation", "test"):
                    row[split].append(evaluators[split].metrics(stored, seed)["kid_std_classifier"])
                row["small"].append(evaluators["validation"].metrics(stored[:250], seed)["kid_std_classifier"])
            print(f"{path.parent.parent.name}: validation {np.mean(row['validation']):.4f}, test {np.mean(row['test']):.4f}", flush=True)
    rows = list(table.values())
    seed_sd = math.sqrt(np.mean([np.var(r[s], ddof=1) for r in rows for s in ("validation", "test")]))
    search_sd = math.sqrt(np.mean([np.var(r["small"], ddof=1) for r in rows]))
    means = {name: np.mean(r["test"]) for name, r in table.items()}
    diffs = np.array([np.mean(r["validation"]) - np.mean(r["test"]) for r in rows])
    ref_var = float(np.var(diffs - diffs.mean(), ddof=1) / 2)
    schedules = sorted({r["schedule"] for r in rows})
    by_seed = {}
    for name, r in table.items():
        by_seed.setdefault(name.rsplit("-s", 1)[1], {})[r["schedule"]] = means[name]
    gaps = [pair[schedules[0]] - pair[schedules[1]] for pair in by_seed.values() if len(pair) == 2]
    own_var = max(0.0, (np.var(gaps, ddof=1) - 2 * ref_var - 2 * seed_sd**2 / 3) / 2)
    between = np.mean([np.var([means[n] for n, r in table.items() if r["schedule"] == s], ddof=1) for s in schedules])
    shared_var = max(0.0, between - own_var - ref_var - seed_sd**2 / 3)
    print(f"measured on {len(rows)} networks: paired gaps {np.round(gaps, 4).tolist()}, between-run variance {between:.3g}")
    return Levels(math.sqrt(shared_var), math.sqrt(own_var), math.sqrt(ref_var), seed_sd, search_sd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="simulated jobs per design and hypothesis")
    parser.add_argument("--quick", action="store_true", help="400 jobs each (well under 3 minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", metavar="RUN_DIR", help="measure the levels from this tuning run's judgement networks")
    parser.add_argument("--shards", help="the run's shards (with --measure)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per seed (with --measure)")
    for name, default in (("train-shared", 0.028), ("train-own", 0.0), ("reference", 0.0068), ("seed", 0.0098), ("search", 0.032)):
        parser.add_argument(f"--{name}-sd", type=float, default=default)
    args = parser.parse_args()
    levels = (measure(args.measure, args.shards, args.samples) if args.measure else
              Levels(args.train_shared_sd, args.train_own_sd, args.reference_sd, args.seed_sd, args.search_sd))
    jobs, design = (400 if args.quick else args.jobs), Design()
    planted = 2 * resolution(levels, design)
    print(f"levels (sd): training seed, shared {levels.train_shared:.4g}, a network's own {levels.train_own:.4g}, "
          f"reference {levels.reference:.4g}, sampling seed {levels.seed:.4g}, "
          f"search evaluation {levels.search:.4g}; {design.finished} finished trials, top {design.top} + recommended, "
          f"{design.seeds} sampling seeds, {design.train_seeds} training runs per schedule; {jobs} jobs each")
    print(f"new design's stated resolution (80% power, paired t, {design.train_seeds - 1} df): {planted / 2:.4g}; planted gap {planted:.4g}")
    print("| design | false 'beat' under no true difference (nominal 2.5%) | 'beat' at the planted gap (power) | "
          "'beat' at the stated resolution (the new design's: 0.8 by construction) | seconds |")
    print("| --- | --- | --- | --- | --- |")
    rates = {}
    for new in (False, True):
        start, rng = time.perf_counter(), np.random.default_rng(args.seed)
        rates[new] = [[job(rng, levels, design, gap, new) for _ in range(jobs)].count("beat") / jobs for gap in (0.0, planted, planted / 2)]
        print(f"| {'new' if new else 'old'} | {rates[new][0]:.3f} | {rates[new][1]:.3f} | {rates[new][2]:.3f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    print(f"false_beat={rates[True][0]:.3f} power={rates[True][1]:.3f}")


if __name__ == "__main__":
    main()

"""A tuning job from start to verdict: the Tuner (restored when the job ran before), the results table, the selection on
the validation split, the judgement on the test split (pipelines.tune.verdict), the best config, the plots and the
parent MLflow run."""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from pipelines.cluster import connect_ray
from data_prep.storage import absolute_location
from ncsn.atomic import atomic_write
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.sample import checkpoint_location
from pipelines.tune.modes import SamplerSearch, ScheduleSearch
from pipelines.tune.objective import ObjectiveSpec
from pipelines.tune.space import label_of
from pipelines.tune.trials import RECOMMENDED_FULL, max_concurrent
from pipelines.tune.verdict import Candidate, Judgement, candidates, judge, score_all, select, verdict

log = logging.getLogger(__name__)


class TuningError(RuntimeError):
    """A tuning job that produced nothing to choose from (no trial reported, or every searched trial failed)."""


@dataclass
class TuneSummary:
    """What a tuning job leaves: the table, the best trial and where its YAML is."""

    rows: list[dict]
    best: dict
    best_config: Path
    parent_run_id: str
    tracking_uri: str
    stopped_early: int
    next_command: str  # train with the best schedule, or (sampler-only mode) sample with the best settings
    verdict: str  # the finalist chosen on the validation split, and whether it beat `recommended` on the test split

    def line(self) -> str:
        rec = next((r for r in self.rows if r["label"] == "recommended"), None)
        vs = f"; recommended schedule: {rec['objective']:.4g}" if rec and rec["objective"] is not None else ""
        return (f"{len(self.rows)} trials ({self.stopped_early} stopped early by ASHA); search's best "
                f"{min(r['objective'] for r in self.rows if r['objective'] is not None):.4g}{vs}\n{self.verdict}\n"
                f"best config: {self.best_config}")



def run_tuning(cfg: Config, shards: str, checkpoint: str | None = None) -> TuneSummary:
    """Tune the schedule by training (default) or, with ``checkpoint``, the sampler of a trained model."""
    checkpoint = checkpoint_location(checkpoint) if checkpoint else None  # a file, a run directory or an MLflow model URI
    # the job's own run (parent of the trials) in <run_dir>/tune, in the same MLflow store
    cfg = cfg.evolve({"tracking.tracking_uri": tracking.tracking_uri(cfg), "name": f"{cfg.name}-tune",
                      "run_dir": str(Path(cfg.run_dir).resolve() / "tune")})
    shards = absolute_location(shards)
    mode = SamplerSearch(cfg, checkpoint) if checkpoint else ScheduleSearch(cfg, shards)  # checks the space, before Ray
    connect_ray()
    objective = ObjectiveSpec.from_config(cfg, shards, "validation")  # the search and the selection; the verdict: test
    if objective.extractor == "classifier":  # train the judge once, before trials start in parallel
        objective.evaluator()
    uri, parent = tracking.open_run(cfg, {"tune.mode": mode.label})
    trainable = mode.trainable(uri, parent, objective)
    storage, name, t = str(Path(cfg.run_dir) / "ray"), cfg.name, cfg.tune
    if tune.Tuner.can_restore(str(Path(storage) / name)):
        log.info("resuming the tuning job in %s", Path(storage) / name)
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable=trainable, resume_unfinished=True,
                                    resume_errored=True)  # under their own ids: a restarted trial's new id is unknown to Optuna
    else:
        searcher = OptunaSearch(metric=t.metric, mode="min", points_to_evaluate=[mode.rec], seed=t.seed)
        tuner = tune.Tuner(trainable, param_space=mode.space(), run_config=tune.RunConfig(name=name, storage_path=storage),
                           tune_config=tune.TuneConfig(metric=t.metric, mode="min", search_alg=searcher,
                                                       scheduler=mode.scheduler(Path(storage) / name / "asha_results.jsonl"),
                                                       num_samples=t.trials,
                                                       max_concurrent_trials=max_concurrent(cfg, mode.cpus_per_trial)))
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C stops the job (resumable), rather than Tune going on to the end
    try:
        results = tuner.fit()
    except BaseException as err:
        tracking.close_child_runs(uri, parent, {}, only_running=True)
        tracking.finish_run(uri, parent, tracking.ended_by(err))
        raise
    return _summarise(cfg, results, mode, uri, parent, objective, shards)


def _rows(results, mode: ScheduleSearch | SamplerSearch, metric: str) -> list[dict]:
    """One row per trial: its point, search objective (validation split) and its interval, last step, stopped early;
    the columns of the selection and the verdict, empty until they run."""
    rows = []
    for r in results:
        m = r.metrics or {}
        last_step = m.get("step")  # the training step of the last report (none in sampler-only mode)
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "label": label_of(r.config, mode.rec),
                     **mode.point(r.config), "objective": m.get(metric), "objective_low": m.get(f"{metric}_low"),
                     "objective_high": m.get(f"{metric}_high"), "last_step": last_step,
                     "stopped_early": bool(mode.max_t and r.error is None and (last_step or 0) < mode.max_t),
                     "error": str(r.error)[:200] if r.error else "", "grid": m.get("grid", ""),
                     **dict.fromkeys(("selection_mean", "selection_low", "selection_high", "finalist", "test_mean", "test_low",
                                      "test_high", "gap_vs_recommended", "gap_low", "gap_high", "gap_sampler_part",
                                      "gap_schedule_part"))})
    return rows


def _judgements(cfg: Config, mode: ScheduleSearch | SamplerSearch, finalists: list[Candidate], rec: Candidate, rows: dict[str, dict],
                uri: str, parent: str, objective: ObjectiveSpec) -> list[Judgement]:
    """Each finalist against `recommended` on the test split: their networks (retrained, or the one checkpoint) scored on
    fresh sampling seeds with their own samplers, and recommended's networks with each finalist's sampler too."""
    t, schedule_mode = cfg.tune, mode.label == "schedule"
    nets = mode.networks([rec, *finalists], rows, uri, parent)
    jobs = [(path, c, c.trial_id) for c in [rec, *finalists] for path in nets[c.trial_id]]
    if schedule_mode:  # attribution: what the finalist's sampler does for recommended's networks
        jobs += [(path, f, f"{rec.trial_id}@{f.trial_id}") for f in finalists if not f.same_sampler(rec) for path in nets[rec.trial_id]]
    scores = score_all([(path, c) for path, c, _ in jobs], objective, t.metric, t.confirm_seeds, t.confirm_samples)
    table: dict[str, list[list[float]]] = {}
    for (_, _, key), found in zip(jobs, scores):
        table.setdefault(key, []).append(found)

    def units(key: str) -> np.ndarray:  # (units, sampling seeds): a network per row, or each seed a unit of one network
        found = np.asarray(table[key])
        return found if schedule_mode else found.T

    def attribution(f: Candidate) -> np.ndarray | None:  # recommended's networks with f's sampler (their own when the same)
        if not schedule_mode:
            return None
        return units(rec.trial_id if f.same_sampler(rec) else f"{rec.trial_id}@{f.trial_id}")

    unit = "training run" if schedule_mode else "sampling seed"
    return [judge(units(f.trial_id), units(rec.trial_id), f.trial_id, unit, len(finalists), attribution(f)) for f in finalists]


def _summarise(cfg: Config, results, mode: ScheduleSearch | SamplerSearch, uri: str, parent: str, objective: ObjectiveSpec,
               shards: str) -> TuneSummary:
    """Results table, selection (validation split), verdict (test split), plots, best YAML; all logged to the parent run;
    children of stopped trials marked KILLED."""
    t, metric, run_dir = cfg.tune, cfg.tune.metric, Path(cfg.run_dir)
    rows = _rows(results, mode, metric)
    if not any(r["objective"] is not None for r in rows):
        raise TuningError(f"no trial reported {metric}; see the trial errors in {run_dir / 'ray'}")
    searched = [r for r in rows if r["label"] == "search"]
    if searched and all(r["error"] for r in searched):
        raise TuningError(f"all {len(searched)} searched trials failed (trial {searched[0]['trial_id']}: {searched[0]['error'][:200]}); "
                          f"their errors are in {run_dir / 'ray'}")
    by_id = {r["trial_id"]: r for r in rows}
    found = candidates(rows, t.select_top or len(rows), mode.checkpoints(rows, uri, parent))
    scores = None
    if t.select_top and found:
        log.info("selection: %d trials re-scored on the validation split", len(found))
        scores = dict(zip((c.trial_id for c in found), score_all([(c.checkpoint, c) for c in found], objective, metric,
                                                                  t.confirm_seeds, t.confirm_samples)))
    order, finalists = select(found, scores, t.finalists) if found else ([], [])
    rec = next((r.candidate for r in order if r.candidate.label == "recommended"), None)
    judged_on = ObjectiveSpec.from_config(cfg, shards, "test")  # nothing before this point scored against it
    if judged_on.reference_split == objective.reference_split:
        raise ConfigError(f"the verdict must not be judged on the split that selected the finalist ({objective.reference_split})")
    judgements = (_judgements(cfg, mode, finalists, rec, by_id, uri, parent, judged_on)
                  if finalists and rec is not None and t.confirm_train_seeds else [])
    for r in order:
        by_id[r.candidate.trial_id].update(selection_mean=r.mean.value, selection_low=r.mean.low, selection_high=r.mean.high,
                                           finalist=r.candidate in finalists)
    for j in judgements:
        by_id[j.finalist].update(test_mean=j.finalist_mean.value, test_low=j.finalist_mean.low, test_high=j.finalist_mean.high,
                                 gap_vs_recommended=j.gap.value, gap_low=j.gap.low, gap_high=j.gap.high,
                                 gap_sampler_part=j.sampler_part.value if j.sampler_part else None,
                                 gap_schedule_part=j.schedule_part.value if j.schedule_part else None)
        by_id[rec.trial_id].update(test_mean=j.recommended_mean.value, test_low=j.recommended_mean.low, test_high=j.recommended_mean.high)
    rec_row = next((r for r in rows if r["label"] == "recommended"), None)
    chosen = order[0].candidate.trial_id if order else None  # the selection's choice; the test split only judges it
    best = by_id[chosen] if chosen else min((r for r in rows if r["objective"] is not None), key=lambda r: r["objective"])
    found_line = (verdict(order, judgements, metric, t.confirm_samples, bool(t.select_top), objective.reference_split,
                          judged_on.reference_split) if order else
                  f"best by the search's own evaluation ({metric} {best['objective']:.4g}); no trial left a checkpoint to select on")
    def table(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(run_dir / "tune_results.csv", table)
    atomic_write(run_dir / "verdict.txt", lambda tmp: tmp.write_text(found_line + "\n"))
    plot = _plot(rows, mode.keys, metric, run_dir / "tune_objective.png")
    best_yaml = run_dir / "best_config.yaml"
    best_cfg, next_command, grid = mode.outcome(best, best_yaml)
    best_cfg = best_cfg.evolve({"name": cfg.name.removesuffix("-tune") + "-best", "run_dir": str(run_dir.parent / "best")})
    header = "".join(f"# {line}\n" for line in found_line.splitlines())
    text = (f"# best of {len(rows)} trials of {cfg.name} (trial {best['trial_id']}, {best['label']})\n{header}"
            f"# next: {next_command}\n" + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    atomic_write(best_yaml, lambda tmp: tmp.write_text(text))
    finalist_row = by_id[finalists[0].trial_id] if finalists else None
    metrics = {**_verdict_metrics(rows, finalist_row, rec_row, judgements, metric), "trials": len(rows),
               "trials_stopped_early": sum(r["stopped_early"] for r in rows)}
    artifacts = {"tune": run_dir / "tune_results.csv", "tune/plots": plot, "tune/best": best_yaml, "tune/verdict": run_dir / "verdict.txt"}
    if grid and grid.exists():
        artifacts["tune/best_samples"] = grid
    tracking.log_to_run(uri, parent, metrics, artifacts, tags={"tune.verdict": found_line.splitlines()[0][:4900], "tune.selected": chosen or "",
                                                                "tune.finalist": finalist_row["trial_id"] if finalist_row else ""})
    judged = {run: "FINISHED" for run in mode.judgement_runs}
    tracking.close_child_runs(uri, parent, {RECOMMENDED_FULL: "FINISHED", **judged, **{r["trial_id"]: "FAILED" if r["error"] else "KILLED"
                                                                                        if r["stopped_early"] else "FINISHED" for r in rows}})
    tracking.finish_run(uri, parent)
    return TuneSummary(rows, best, best_yaml, parent, uri, metrics["trials_stopped_early"], next_command, found_line)


def _verdict_metrics(rows: list[dict], finalist: dict | None, rec_row: dict | None, judgements: list[Judgement], metric: str) -> dict[str, float]:
    """The parent run's numbers: the search's best and recommended objective, the selection's means (validation split)
    and the first finalist's judgement (test split): both schedules' means, the gap, its parts, the variance components."""
    out = {f"best_{metric}": min(r["objective"] for r in rows if r["objective"] is not None)}
    if rec_row and rec_row["objective"] is not None:
        out[f"recommended_{metric}"] = rec_row["objective"]
    for name, row in (("finalist", finalist), ("recommended", rec_row)):
        if row and row["selection_mean"] is not None:
            out[f"validation_{name}_{metric}"] = row["selection_mean"]
    if judgements:
        j = judgements[0]
        for name, e in (("test_finalist_" + metric, j.finalist_mean), ("test_recommended_" + metric, j.recommended_mean),
                        ("gap_vs_recommended", j.gap)):
            out.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high})
        out.update(gap_detectable=j.detectable, between_runs_sd=j.between_sd, within_run_sd=j.within_sd)
        if j.sampler_part:
            out.update(gap_sampler_part=j.sampler_part.value, gap_schedule_part=j.schedule_part.value)
    return out


def _plot(rows: list[dict], keys: tuple[str, ...], metric: str, out: Path) -> Path:
    """The objective against up to three searched settings (trials coloured by label), and, after the selection, each
    re-scored trial's search value beside its selection mean with the 95% interval (validation split)."""
    import matplotlib  # heavy: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    shown = [k for k in keys if k in ("sigma_max", "sigma_min", "num_levels", "eps", "start_level", "steps_per_level")][:3]
    selected = sorted((r for r in rows if r["selection_mean"] is not None), key=lambda r: r["selection_mean"])
    intervals = all(r["selection_low"] == r["selection_low"] for r in selected)  # NaN when ranked by one search evaluation
    fig, axes = plt.subplots(1, len(shown) + bool(selected), figsize=(4 * (len(shown) + bool(selected)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], shown):
        for label, colour in (("search", "tab:blue"), ("recommended", "tab:red")):
            pts = [(r[key], r["objective"]) for r in rows if r["label"] == label and r["objective"] is not None]
            if pts:
                ax.scatter(*zip(*pts), c=colour, label=label, s=30)
        if key in ("sigma_max", "sigma_min", "eps"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (validation)")
    axes[0][0].legend()
    if selected:
        ax = axes[0][-1]
        x = range(len(selected))
        means = [r["selection_mean"] for r in selected]
        colours = ["tab:red" if r["label"] == "recommended" else "tab:green" if r["finalist"] else "tab:blue" for r in selected]
        if intervals:
            err = [[m - r["selection_low"] for m, r in zip(means, selected)], [r["selection_high"] - m for m, r in zip(means, selected)]]
            ax.errorbar(x, means, yerr=err, fmt="none", ecolor="grey", capsize=4)
        ax.scatter(x, means, c=colours, s=30, label="selection mean (95% t)" if intervals else "search value")
        ax.scatter(x, [r["objective"] for r in selected], facecolors="none", edgecolors=colours, s=30, label="search")
        ax.set_xticks(list(x), [r["trial_id"][-5:] for r in selected], rotation=45)
        ax.set_ylabel(f"{metric} (validation)")
        ax.set_title("selection (green: finalist)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""σ-schedule and sampler tuning with Ray Tune, in two modes over one job: `ScheduleSearch` (each trial trains a model
with its σ schedule and sampler; Train V2 pattern: a function that fits a TorchTrainer whose reports reach Tune through
TuneReportCallback; ASHA stops weak trials at the objective's evaluations) and `SamplerSearch` (each trial samples a
trained checkpoint once with its ε, T and first σ level). Optuna proposes trials, starting from the recommended point
(trial "recommended"); the search, ASHA and the choice of the finalist score against the validation split, and the
verdict judges the finalist against `recommended` on the test split (pipelines.confirm). One MLflow parent run for the
job, a child run per trial and per training run of the judgement; restarting the same job resumes it."""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from data_prep.cluster import connect_ray
from data_prep.shard import load_manifest
from data_prep.storage import Storage, absolute_location
from ncsn.figures import save_image_grid
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.confirm import TRAIN_SEED_OFFSET, Candidate, Judgement, candidates, judge, score_all, select, verdict
from pipelines.objective import ObjectiveSpec, sample_and_score
from pipelines.sample import SamplingError, checkpoint_location, load_model, read_checkpoint
from pipelines.train import CHECKPOINT_FILE, resolve_schedule, run_training

log = logging.getLogger(__name__)
PARAMS = ("sigma_max", "sigma_min", "num_levels", "eps", "steps_per_level")
RECOMMENDED_FULL = "recommended-full"  # the recommended schedule trained to the end after ASHA stopped its trial


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
    from ray import tune

    t = cfg.tune
    lo_min, hi_min = min(t.sigma_min[0], rec["sigma_min"]), max(t.sigma_min[1], rec["sigma_min"])
    levels = (max(2, math.floor(rec["num_levels"] * t.num_levels_scale[0])), max(2, math.ceil(rec["num_levels"] * t.num_levels_scale[1])))
    return {
        "sigma_max": _log_uniform(rec["sigma_max"] * t.sigma_max_scale[0], rec["sigma_max"] * t.sigma_max_scale[1]),
        "sigma_min": _log_uniform(lo_min, hi_min),
        "num_levels": tune.randint(min(levels[0], rec["num_levels"]), max(levels[1], rec["num_levels"]) + 1),
        **_sampler_space(cfg, rec),
    }


def _log_uniform(low: float, high: float):
    """Log-uniform over [low, high], the upper end included (the recommended point may lie on it)."""
    from ray import tune

    return tune.loguniform(low, high * (1 + 1e-9))


def _sampler_space(cfg: Config, rec: dict) -> dict:
    """ε (× the recommended one) and T (the listed choices and the recommended one): searched in both modes."""
    from ray import tune

    return {"eps": _log_uniform(rec["eps"] * cfg.tune.eps_scale[0], rec["eps"] * cfg.tune.eps_scale[1]),
            "steps_per_level": tune.choice(sorted(set(cfg.tune.steps_per_level) | {rec["steps_per_level"]}))}


def apply_point(cfg: Config, point: dict) -> Config:
    """A copy of ``cfg`` with a trial's schedule and sampler settings (the schedule then fixed, not recommended)."""
    if point["sigma_min"] >= point["sigma_max"]:
        raise ConfigError(f"trial σ_min {point['sigma_min']:.4g} >= σ_max {point['sigma_max']:.4g}; narrow tune.sigma_min")
    return cfg.evolve({"schedule.recommend": False, "schedule.sigma_max": float(point["sigma_max"]),
                       "schedule.sigma_min": float(point["sigma_min"]), "schedule.num_levels": int(point["num_levels"]),
                       "sampling.eps": float(point["eps"]), "sampling.steps_per_level": int(point["steps_per_level"])})


def _label(point: dict, rec: dict) -> str:
    return "recommended" if all(point.get(k) == v for k, v in rec.items()) else "search"


def _trial_config(base: Config, trial: str, uri: str) -> Config:
    """The config of one trial: its own name and directory under <run_dir>/trials, the job's MLflow store; trials
    register no model (a registered name is for the run a user chooses)."""
    return base.evolve({"name": f"{base.name}-{trial}", "run_dir": str(Path(base.run_dir) / "trials" / trial),
                        "tracking.tracking_uri": uri, "tracking.register_model": None})


def _train_trial(point: dict, *, base: Config, shards: str, uri: str, parent_run_id: str, rec: dict, objective: ObjectiveSpec) -> None:
    """One trial: train with the trial's schedule, reporting the objective every tune.eval_every steps."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_id()
    every = base.tune.eval_every
    cfg = apply_point(_trial_config(base, trial, uri), point).evolve({"train.log_every": every, "train.checkpoint_every": every,
                                                                      "train.sample_every": every})
    run_training(cfg, shards, parent_run_id=parent_run_id, objective=objective, callbacks=[TuneReportCallback()],
                 extra_params={"tune.label": _label(point, rec), "tune.trial_id": trial})


def _final_checkpoint(trial: Config, steps: int) -> str | None:
    """A trial's checkpoint at the end of its training budget: <trial>/model/checkpoint.pt, else the last of Ray Train's
    checkpoints (Tune stops a trial that reaches max_t before that copy is made); None if training stopped earlier."""
    local = Path(trial.run_dir) / "model" / CHECKPOINT_FILE
    if local.exists():
        return str(local)
    store = Storage(f"{(trial.cluster.storage_path or str(Path(trial.run_dir, 'ray'))).rstrip('/')}/{trial.name}")
    saved = [f"{name}/{CHECKPOINT_FILE}" for name in store.children() if name.startswith("checkpoint_")]  # named by time
    last = next((rel for rel in reversed(saved) if store.exists(rel)), None)
    if last is None:
        return None
    path = store.path(last)
    try:
        return path if read_checkpoint(path)[0].step >= steps else None
    except SamplingError as err:
        log.warning("run %s: %s; it is left out of the verdict", trial.name, err)
        return None


def _trial_checkpoint(cfg: Config, trial_id: str) -> str | None:
    return _final_checkpoint(_trial_config(cfg, trial_id, cfg.tracking.tracking_uri), cfg.train.steps)


def _train_for_judgement(run_cfg: Config, shards: str, parent_run_id: str, label: str, run_id: str) -> None:
    run_training(run_cfg, shards, parent_run_id=parent_run_id, extra_params={"tune.label": label, "tune.trial_id": run_id,
                                                                           "tune.stage": "judgement"})


def retrain(cfg: Config, shards: str, points: dict[str, tuple[str, dict]], seeds: list[int], uri: str, parent: str,
            concurrent: int) -> dict[str, list[str]]:
    """Train each schedule of ``points`` ({trial id: (label, point)}) once per training seed in ``seeds``, to the full
    budget, as parallel Ray Train runs (at most ``concurrent`` at once; a run already complete is kept, a stopped one
    resumes), each a child run "<name>-judge-<trial>-s<seed>" of the job; returns each schedule's checkpoints in seed order."""
    import ray

    runs = {(trial, seed): apply_point(_trial_config(cfg, f"judge-{trial}-s{seed}", uri), point).evolve({"train.seed": seed})
            for trial, (_, point) in points.items() for seed in seeds}
    todo = [key for key, run_cfg in runs.items() if _final_checkpoint(run_cfg, cfg.train.steps) is None]
    log.info("judgement: training %d schedule(s) on %d fresh training seed(s) each (%d run(s) to do)", len(points), len(seeds), len(todo))
    task, pending = ray.remote(num_cpus=0, max_retries=0)(_train_for_judgement), []  # the trainer holds the CPUs
    while todo or pending:
        while todo and len(pending) < concurrent:
            trial, seed = todo.pop(0)
            pending.append(task.remote(runs[(trial, seed)], shards, parent, points[trial][0], f"judge-{trial}-s{seed}"))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    found = {key: _final_checkpoint(run_cfg, cfg.train.steps) for key, run_cfg in runs.items()}
    missing = [runs[key].name for key, path in found.items() if path is None]
    if missing:
        raise ConfigError(f"judgement runs without a final checkpoint: {', '.join(missing)}")
    return {trial: [found[(trial, seed)] for seed in seeds] for trial in points}


def _train_recommended_fully(cfg: Config, rec: dict, shards: str, uri: str, parent_run_id: str) -> None:
    """Train the recommended schedule for the whole budget, outside the search: ASHA stopped its trial, and the verdict
    must compare fully trained models. A child run "<name>-recommended-full" of the job."""
    log.info("ASHA stopped the recommended trial; training the recommended schedule to the end for the confirmation")
    trial_cfg = apply_point(_trial_config(cfg, RECOMMENDED_FULL, uri), rec)
    run_training(trial_cfg, shards, parent_run_id=parent_run_id, extra_params={"tune.label": "recommended", "tune.trial_id": RECOMMENDED_FULL})


def _sampler_trial(point: dict, *, base: Config, checkpoint: str, uri: str, parent_run_id: str, rec: dict, objective: ObjectiveSpec) -> None:
    """One sampler-only trial: sample from the trained checkpoint with the trial's ε, T and sub-schedule (the levels
    from start_level on), evaluate, log a child MLflow run and report once."""
    from ray import tune

    trial = tune.get_context().get_trial_id()
    cfg = _trial_config(base, trial, uri).evolve({"sampling.eps": float(point["eps"]), "sampling.steps_per_level": int(point["steps_per_level"])})
    label = _label(point, rec)
    _, run_id = tracking.open_run(cfg, {"tune.label": label, "tune.trial_id": trial, "tune.start_level": str(point["start_level"]),
                                        "tune.checkpoint": checkpoint}, parent_run_id=parent_run_id)
    model, ckpt = load_model(read_checkpoint(checkpoint)[1])
    metrics, samples = sample_and_score(objective.evaluator(), model, ckpt.sigmas[int(point["start_level"]):], cfg.sampling.eps,
                                        cfg.sampling.steps_per_level, objective, seed=cfg.tune.seed)
    grid = Path(cfg.run_dir) / "samples.png"
    save_image_grid(samples[:100], grid, nrow=10, scale=max(1, 32 // ckpt.model_config.image_size))
    tracking.log_to_run(uri, run_id, metrics, {"samples": grid})
    tracking.finish_run(uri, run_id)
    tune.report({**metrics, "label": label, "grid": str(grid)})


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


def _max_concurrent(cfg: Config, cpus_per_trial: float) -> int:
    import ray

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    res = ray.cluster_resources()
    if cfg.cluster.use_gpu:
        return max(1, int(res.get("GPU", 0) // max(1, cfg.cluster.num_workers)))
    return max(1, int(res.get("CPU", 1) // cpus_per_trial))


class ScheduleSearch:
    """Each trial trains a model with its σ schedule, ε and T; ASHA stops weak trials at the objective's evaluations."""

    label = "schedule"
    keys = PARAMS

    def __init__(self, cfg: Config, shards: str):
        self.cfg, self.shards, self.judgement_runs = cfg, shards, []
        self.rec = recommended_point(cfg, load_manifest(shards))
        self.max_t = cfg.train.steps  # ASHA's clock is the training step: a resumed trial's Tune iterations restart at 1
        self.cpus_per_trial = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker

    def space(self) -> dict:
        return search_space(self.cfg, self.rec)

    def trainable(self, uri: str, parent: str, objective: ObjectiveSpec):
        from ray import tune

        return tune.with_resources(tune.with_parameters(_train_trial, base=self.cfg, shards=self.shards, uri=uri, parent_run_id=parent,
                                                        rec=self.rec, objective=objective),
                                   {"CPU": 0.0, "memory": 2**20})  # the trial driver only waits; its TorchTrainer holds the CPUs

    def scheduler(self, history: Path):
        """ASHA on the training step, its rungs kept in ``history`` across a restart of the job."""
        from pipelines.asha import ResumableASHA

        t = self.cfg.tune
        return ResumableASHA(str(history), max_t=self.max_t, grace_period=min(t.grace_period * t.eval_every, self.max_t),
                             reduction_factor=t.reduction_factor)

    def checkpoints(self, rows: list[dict], uri: str, parent: str) -> Callable[[dict], str | None]:
        """Each row's checkpoint at the end of the training budget; first trains the recommended schedule to the end when
        ASHA stopped its trial (the verdict compares fully trained models)."""
        def checkpoint_of(row: dict) -> str | None:
            found = _trial_checkpoint(self.cfg, row["trial_id"])
            return found or (_trial_checkpoint(self.cfg, RECOMMENDED_FULL) if row["label"] == "recommended" else None)

        rec_row = next((r for r in rows if r["label"] == "recommended" and r["objective"] is not None), None)
        if rec_row and checkpoint_of(rec_row) is None:
            _train_recommended_fully(self.cfg, self.rec, self.shards, uri, parent)
        return checkpoint_of

    def networks(self, schedules: list[Candidate], rows: dict[str, dict], uri: str, parent: str) -> dict[str, list[str]]:
        """The judgement's networks: each schedule trained again on tune.confirm_train_seeds fresh training seeds (the same
        seeds for every schedule, so gaps pair), to the full budget; the unit of the verdict is the training run."""
        seeds = [self.cfg.train.seed + TRAIN_SEED_OFFSET + i for i in range(self.cfg.tune.confirm_train_seeds)]
        points = {c.trial_id: (c.label, {k: rows[c.trial_id][k] for k in PARAMS}) for c in schedules}
        self.judgement_runs = [f"judge-{trial}-s{seed}" for trial in points for seed in seeds]
        return retrain(self.cfg, self.shards, points, seeds, uri, parent, _max_concurrent(self.cfg, self.cpus_per_trial))

    def outcome(self, best: dict, best_yaml: Path) -> tuple[Config, str, Path | None]:
        """The best trial's config, the command that uses it, its last sample grid."""
        grids = sorted((Path(self.cfg.run_dir) / "trials" / best["trial_id"] / "samples").glob("step_*.png"))
        return apply_point(self.cfg, best), f"ncsn-pipeline train --config {best_yaml}", grids[-1] if grids else None


class SamplerSearch:
    """Each trial samples a trained checkpoint once with its ε, T and first σ level (the levels from start_level on)."""

    label = "sampler"
    keys = ("start_level", "eps", "steps_per_level")
    max_t = None  # one report per trial: nothing to stop early
    cpus_per_trial = 1.0
    judgement_runs: list[str] = []  # the verdict trains nothing: it samples the one checkpoint

    def __init__(self, cfg: Config, checkpoint: str):
        self.cfg, self.checkpoint = cfg, checkpoint
        ckpt = read_checkpoint(checkpoint)[0]
        self.sigmas, trained = ckpt.sigmas.tolist(), ckpt.schedule
        self.rec = {"start_level": 0, "eps": trained.eps if trained.eps is not None else cfg.sampling.eps,
                    "steps_per_level": trained.steps_per_level if trained.steps_per_level is not None else cfg.sampling.steps_per_level}

    def space(self) -> dict:
        from ray import tune

        return {"start_level": tune.randint(0, max(1, len(self.sigmas) // 2) + 1), **_sampler_space(self.cfg, self.rec)}

    def trainable(self, uri: str, parent: str, objective: ObjectiveSpec):
        from ray import tune

        return tune.with_resources(tune.with_parameters(_sampler_trial, base=self.cfg, checkpoint=self.checkpoint, uri=uri,
                                                        parent_run_id=parent, rec=self.rec, objective=objective), {"CPU": 1})

    def scheduler(self, history: Path):
        """FIFO: one report per trial, so nothing to stop early and no rungs to keep (``history`` is not written)."""
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()

    def checkpoints(self, rows: list[dict], uri: str, parent: str) -> Callable[[dict], str | None]:
        return lambda row: self.checkpoint

    def networks(self, schedules: list[Candidate], rows: dict[str, dict], uri: str, parent: str) -> dict[str, list[str]]:
        """One network, the tuned checkpoint: the unit of the verdict is the sampling seed."""
        return {c.trial_id: [self.checkpoint] for c in schedules}

    def outcome(self, best: dict, best_yaml: Path) -> tuple[Config, str, Path | None]:
        """The config with the best sampler settings, the `sample` command that uses them, the trial's grid."""
        sigmas, out = self.sigmas[int(best["start_level"]):], Path(self.cfg.run_dir).parent / "best" / "samples"
        command = (f"ncsn-pipeline sample --checkpoint {self.checkpoint} --num-samples {self.cfg.sampling.num_samples} --output {out} "
                   f"--eps {best['eps']:.6g} --steps-per-level {best['steps_per_level']}"
                   + (f" --sigmas {' '.join(f'{x:.6g}' for x in sigmas)}" if best["start_level"] else ""))
        best_cfg = self.cfg.evolve({"sampling.eps": float(best["eps"]), "sampling.steps_per_level": int(best["steps_per_level"])})
        return best_cfg, command, Path(best["grid"]) if best["grid"] else None


def run_tuning(cfg: Config, shards: str, checkpoint: str | None = None) -> TuneSummary:
    """Tune the schedule by training (default) or, with ``checkpoint``, the sampler of a trained model."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    checkpoint = checkpoint_location(checkpoint) if checkpoint else None  # a file, a run directory or an MLflow model URI
    connect_ray()
    # the job's own run (parent of the trials) in <run_dir>/tune, in the same MLflow store
    cfg = cfg.evolve({"tracking.tracking_uri": tracking.tracking_uri(cfg), "name": f"{cfg.name}-tune",
                      "run_dir": str(Path(cfg.run_dir).resolve() / "tune")})
    shards = absolute_location(shards)
    mode = SamplerSearch(cfg, checkpoint) if checkpoint else ScheduleSearch(cfg, shards)
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
                                                       max_concurrent_trials=_max_concurrent(cfg, mode.cpus_per_trial)))
    return _summarise(cfg, tuner.fit(), mode, uri, parent, objective, shards)


def _rows(results, mode: ScheduleSearch | SamplerSearch, metric: str) -> list[dict]:
    """One row per trial: its point, search objective (validation split) and its interval, last step, stopped early;
    the columns of the selection and the verdict, empty until they run."""
    rows = []
    for r in results:
        m = r.metrics or {}
        last_step = m.get("step")  # the training step of the last report (none in sampler-only mode)
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "label": _label(r.config, mode.rec),
                     **{k: r.config.get(k) for k in mode.keys}, "objective": m.get(metric), "objective_low": m.get(f"{metric}_low"),
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
        raise ConfigError(f"no trial reported {metric}; see the trial errors in {run_dir / 'ray'}")
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
    with open(run_dir / "tune_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "verdict.txt").write_text(found_line + "\n")
    plot = _plot(rows, mode.keys, metric, run_dir / "tune_objective.png")
    best_yaml = run_dir / "best_config.yaml"
    best_cfg, next_command, grid = mode.outcome(best, best_yaml)
    best_cfg = best_cfg.evolve({"name": cfg.name.removesuffix("-tune") + "-best", "run_dir": str(run_dir.parent / "best")})
    header = "".join(f"# {line}\n" for line in found_line.splitlines())
    best_yaml.write_text(f"# best of {len(rows)} trials of {cfg.name} (trial {best['trial_id']}, {best['label']})\n{header}"
                         f"# next: {next_command}\n" + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    metrics = {**_verdict_metrics(rows, best, rec_row, judgements, metric), "trials": len(rows),
               "trials_stopped_early": sum(r["stopped_early"] for r in rows)}
    artifacts = {"tune": run_dir / "tune_results.csv", "tune/plots": plot, "tune/best": best_yaml, "tune/verdict": run_dir / "verdict.txt"}
    if grid and grid.exists():
        artifacts["tune/best_samples"] = grid
    tracking.log_to_run(uri, parent, metrics, artifacts, tags={"tune.verdict": found_line.splitlines()[0][:4900],
                                                                "tune.finalist": chosen or ""})
    judged = {run: "FINISHED" for run in mode.judgement_runs}
    tracking.close_child_runs(uri, parent, {RECOMMENDED_FULL: "FINISHED", **judged, **{r["trial_id"]: "FAILED" if r["error"] else "KILLED"
                                                                                        if r["stopped_early"] else "FINISHED" for r in rows}})
    tracking.finish_run(uri, parent)
    return TuneSummary(rows, best, best_yaml, parent, uri, metrics["trials_stopped_early"], next_command, found_line)


def _verdict_metrics(rows: list[dict], best: dict, rec_row: dict | None, judgements: list[Judgement], metric: str) -> dict[str, float]:
    """The parent run's numbers: the search's best and recommended objective, the selection's means (validation split)
    and the first finalist's judgement (test split): both schedules' means, the gap, its parts, the variance components."""
    out = {f"best_{metric}": min(r["objective"] for r in rows if r["objective"] is not None)}
    if rec_row and rec_row["objective"] is not None:
        out[f"recommended_{metric}"] = rec_row["objective"]
    for name, row in (("finalist", best), ("recommended", rec_row)):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

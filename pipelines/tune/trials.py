"""What a tuning job runs on the cluster: a schedule trial (a Ray Train run reporting the objective to Tune), a
sampler-only trial, the training runs of the judgement, and the lookup of a run's final checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from data_prep.storage import Storage
from ncsn.images import save_image_grid
from ncsn.sampling import nfe
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.sample import SamplingError, load_model, read_checkpoint
from pipelines.train import CHECKPOINT_FILE, run_training
from pipelines.tune.objective import ObjectiveSpec, sample_and_score
from pipelines.tune.space import apply_point, label_of, setting_schedule

log = logging.getLogger(__name__)
RECOMMENDED_FULL = "recommended-full"  # the recommended schedule trained to the end after ASHA stopped its trial


def trial_config(base: Config, trial: str, uri: str) -> Config:
    """The config of one trial: its own name and directory under <run_dir>/trials, the job's MLflow store; trials
    register no model (a registered name is for the run a user chooses) and score no checkpoints (the tuning objective
    scores them, and the verdict compares the networks at the full budget, not a checkpoint chosen on validation)."""
    return base.evolve({"name": f"{base.name}-{trial}", "run_dir": str(Path(base.run_dir) / "trials" / trial),
                        "tracking.tracking_uri": uri, "tracking.register_model": None, "evaluation.checkpoint_samples": 0})


def train_trial(point: dict, *, base: Config, shards: str, uri: str, parent_run_id: str, rec: dict, objective: ObjectiveSpec) -> None:
    """One trial: train with the trial's schedule, reporting the objective every tune.eval_every steps."""
    trial = tune.get_context().get_trial_id()
    every = base.tune.eval_every
    cfg = apply_point(trial_config(base, trial, uri), point).evolve({"train.log_every": every, "train.checkpoint_every": every,
                                                                      "train.sample_every": every})
    run_training(cfg, shards, parent_run_id=parent_run_id, objective=objective, callbacks=[TuneReportCallback()],
                 extra_params={"tune.label": label_of(point, rec), "tune.trial_id": trial})


def final_checkpoint(trial: Config, steps: int) -> str | None:
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


def trial_checkpoint(cfg: Config, trial_id: str) -> str | None:
    """The final checkpoint of trial ``trial_id`` of the job ``cfg``, or None."""
    return final_checkpoint(trial_config(cfg, trial_id, cfg.tracking.tracking_uri), cfg.train.steps)


def _train_for_judgement(run_cfg: Config, shards: str, parent_run_id: str, label: str, run_id: str) -> None:
    run_training(run_cfg, shards, parent_run_id=parent_run_id, extra_params={"tune.label": label, "tune.trial_id": run_id,
                                                                           "tune.stage": "judgement"})


def retrain(cfg: Config, shards: str, points: dict[str, tuple[str, dict]], seeds: list[int], uri: str, parent: str,
            concurrent: int) -> dict[str, list[str]]:
    """Train each schedule of ``points`` ({trial id: (label, point)}) once per training seed in ``seeds``, to the full
    budget, as parallel Ray Train runs (at most ``concurrent`` at once; a run already complete is kept, a stopped one
    resumes), each a child run "<name>-judge-<trial>-s<seed>" of the job; returns each schedule's checkpoints in seed order."""
    runs = {(trial, seed): apply_point(trial_config(cfg, f"judge-{trial}-s{seed}", uri), point).evolve({"train.seed": seed})
            for trial, (_, point) in points.items() for seed in seeds}
    todo = [key for key, run_cfg in runs.items() if final_checkpoint(run_cfg, cfg.train.steps) is None]
    log.info("judgement: training %d schedule(s) on %d fresh training seed(s) each (%d run(s) to do)", len(points), len(seeds), len(todo))
    task, pending = ray.remote(num_cpus=0, max_retries=0)(_train_for_judgement), []  # the trainer holds the CPUs
    while todo or pending:
        while todo and len(pending) < concurrent:
            trial, seed = todo.pop(0)
            pending.append(task.remote(runs[(trial, seed)], shards, parent, points[trial][0], f"judge-{trial}-s{seed}"))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    found = {key: final_checkpoint(run_cfg, cfg.train.steps) for key, run_cfg in runs.items()}
    missing = [runs[key].name for key, path in found.items() if path is None]
    if missing:
        raise ConfigError(f"judgement runs without a final checkpoint: {', '.join(missing)}")
    return {trial: [found[(trial, seed)] for seed in seeds] for trial in points}


def train_recommended_fully(cfg: Config, rec: dict, shards: str, uri: str, parent_run_id: str) -> None:
    """Train the recommended schedule for the whole budget, outside the search: ASHA stopped its trial, and the verdict
    must compare fully trained models. A child run "<name>-recommended-full" of the job."""
    log.info("ASHA stopped the recommended trial; training the recommended schedule to the end for the selection")
    trial_cfg = apply_point(trial_config(cfg, RECOMMENDED_FULL, uri), rec)
    run_training(trial_cfg, shards, parent_run_id=parent_run_id, extra_params={"tune.label": "recommended", "tune.trial_id": RECOMMENDED_FULL})


def sampler_trial(point: dict, *, base: Config, checkpoint: str, payload: bytes, uri: str, parent_run_id: str, rec: dict,
                  objective: ObjectiveSpec) -> None:
    """One sampler-only trial: sample from the trained checkpoint with the trial's sub-schedule (the levels from
    start_level on), ε and sampler setting, evaluate, log a child MLflow run and report once."""
    trial = tune.get_context().get_trial_id()
    model, ckpt = load_model(payload)
    base_schedule = setting_schedule(point["sampler"], ckpt.schedule)
    schedule = base_schedule.from_level(int(point["start_level"]), float(point["eps"]), base_schedule.steps_per_level)
    cfg = trial_config(base, trial, uri).evolve({"sampling.eps": float(point["eps"]),
                                                 "sampling.steps_per_level": schedule.steps_per_level or base.sampling.steps_per_level})
    label, cost = label_of(point, rec), nfe(schedule, model.levels_only)
    _, run_id = tracking.open_run(cfg, {"tune.label": label, "tune.trial_id": trial, "tune.start_level": str(point["start_level"]),
                                        "tune.sampler": point["sampler"], "tune.nfe": str(cost), "tune.checkpoint": checkpoint},
                                  parent_run_id=parent_run_id)
    metrics, samples = sample_and_score(objective.evaluator(), model, schedule, objective, seed=cfg.tune.seed)
    grid = Path(cfg.run_dir) / "samples.png"
    save_image_grid(samples[:100], grid, nrow=10)
    tracking.log_to_run(uri, run_id, metrics, {"samples": grid})
    tracking.finish_run(uri, run_id)
    tune.report({**metrics, "label": label, "grid": str(grid)})


def max_concurrent(cfg: Config, cpus_per_trial: float) -> int:
    """Trials (or training runs) at once: tune.max_concurrent, else the cluster's CPUs (or GPUs) over one's needs."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    res = ray.cluster_resources()
    if cfg.cluster.use_gpu:
        return max(1, int(res.get("GPU", 0) // max(1, cfg.cluster.num_workers)))
    return max(1, int(res.get("CPU", 1) // cpus_per_trial))

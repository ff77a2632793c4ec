"""The two kinds of tuning job: ScheduleSearch (each trial trains a model with its σ schedule and sampler; ASHA stops
weak trials) and SamplerSearch (each trial samples one trained checkpoint with its first σ level, ε and sampler). Each says
what its trials run, how they are scheduled, where their networks are for the selection and the judgement, and what
the chosen point means for the user."""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from data_prep.manifest import load_manifest
from ncsn.sampling import nfe
from ncsn.sigmas import Sampler, Schedule
from pipelines.config import Config
from pipelines.sample import open_checkpoint
from pipelines.tune.asha import ResumableASHA
from pipelines.tune.objective import ObjectiveSpec
from pipelines.tune.space import (PARAMS, apply_point, check_space, recommended_point, sampler_settings, search_space,
                                  setting_nfe, setting_schedule, setting_text)
from pipelines.tune.trials import (RECOMMENDED_FULL, max_concurrent, retrain, sampler_trial, train_recommended_fully, train_trial,
                                   trial_checkpoint)
from pipelines.tune.verdict import TRAIN_SEED_OFFSET, Candidate



def sampler_flags(sampler: Sampler, default: Sampler) -> str:
    """The `sample` flags that select ``sampler`` on a checkpoint whose own is ``default``: its name, and each setting
    that differs from what `sample` starts from (``default`` for the same sampler, else that sampler's defaults)."""
    base = default if sampler.name == default.name else Sampler(sampler.name)
    changed = [(f.name, getattr(sampler, f.name)) for f in fields(Sampler) if f.name != "name" and getattr(sampler, f.name) != getattr(base, f.name)]
    if any(k == "steps" and v is None for k, v in changed):
        raise ValueError(f"{sampler.text()}: `sample` has no flag for the model's own levels once {default.text()} sets a grid")
    flag = {"steps": "sampler-steps"}
    return " ".join([f"--sampler {sampler.name}"] + [f"--{flag.get(k, k.replace('_', '-'))} {'inf' if v is None else format(v, '.6g')}"
                                                       for k, v in changed])


class ScheduleSearch:
    """Each trial trains a model with its σ schedule, ε and T; ASHA stops weak trials at the objective's evaluations."""

    label = "schedule"
    keys = PARAMS

    def __init__(self, cfg: Config, shards: str):
        self.cfg, self.shards, self.judgement_runs = cfg, shards, []
        self.rec = recommended_point(cfg, load_manifest(shards))
        check_space(cfg, self.rec)
        self.max_t = cfg.train.steps  # ASHA's clock is the training step: a resumed trial's Tune iterations restart at 1
        self.cpus_per_trial = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker

    def space(self) -> dict:
        return search_space(self.cfg, self.rec)

    def describe(self) -> str:
        """The job's trials, search space and budget, as `tune --dry-run` prints them."""
        t, rec = self.cfg.tune, self.rec
        return (f"tune the schedule: {t.trials} trials (the first NCSNv2's recommendation: σ_max {rec['sigma_max']:.4g}, σ_min "
                f"{rec['sigma_min']:.4g}, L = {rec['num_levels']}, ε {rec['eps']:.3g}, T = {rec['steps_per_level']}), each training "
                f"up to {self.cfg.train.steps} steps on {self.cfg.cluster.num_workers} worker(s), {t.metric} of {t.eval_samples} "
                f"samples on the validation split every {t.eval_every} steps; ASHA (grace {t.grace_period} evaluations, "
                f"reduction {t.reduction_factor}).\nsearched: σ_max × {t.sigma_max_scale} and ε × {t.eps_scale} of the "
                f"recommendation, σ_min in {t.sigma_min}, L × {t.num_levels_scale}, T in {sorted(set(t.steps_per_level))}.\n"
                f"then: the best {t.select_top} and `recommended` re-scored on {t.confirm_seeds} seeds × {t.confirm_samples} "
                f"samples (validation); " + (f"{t.finalists} finalist(s) and `recommended` retrained on {t.confirm_train_seeds} "
                                             "fresh training seeds and judged on the test split"
                                             if t.confirm_train_seeds else "no judgement (tune.confirm_train_seeds = 0)"))

    def point(self, config: dict) -> dict:
        """A trial's row columns: its point."""
        return {k: config.get(k) for k in self.keys}

    def trainable(self, uri: str, parent: str, objective: ObjectiveSpec):
        return tune.with_resources(tune.with_parameters(train_trial, base=self.cfg, shards=self.shards, uri=uri, parent_run_id=parent,
                                                        rec=self.rec, objective=objective),
                                   {"CPU": 0.0, "memory": 2**20})  # the trial driver only waits; its TorchTrainer holds the CPUs

    def scheduler(self, history: Path):
        """ASHA on the training step, its rungs kept in ``history`` across a restart of the job."""
        t = self.cfg.tune
        return ResumableASHA(str(history), max_t=self.max_t, grace_period=min(t.grace_period * t.eval_every, self.max_t),
                             reduction_factor=t.reduction_factor)

    def checkpoints(self, rows: list[dict], uri: str, parent: str) -> Callable[[dict], str | None]:
        """Each row's checkpoint at the end of the training budget; first trains the recommended schedule to the end when
        ASHA stopped its trial (the verdict compares fully trained models)."""
        def checkpoint_of(row: dict) -> str | None:
            found = trial_checkpoint(self.cfg, row["trial_id"])
            return found or (trial_checkpoint(self.cfg, RECOMMENDED_FULL) if row["label"] == "recommended" else None)

        rec_row = next((r for r in rows if r["label"] == "recommended" and r["objective"] is not None), None)
        if rec_row and checkpoint_of(rec_row) is None:
            train_recommended_fully(self.cfg, self.rec, self.shards, uri, parent)
        return checkpoint_of

    def networks(self, schedules: list[Candidate], rows: dict[str, dict], uri: str, parent: str) -> dict[str, list[str]]:
        """The judgement's networks: each schedule trained again on tune.confirm_train_seeds fresh training seeds (the same
        seeds for every schedule, so gaps pair), to the full budget; the unit of the verdict is the training run."""
        seeds = [self.cfg.train.seed + TRAIN_SEED_OFFSET + i for i in range(self.cfg.tune.confirm_train_seeds)]
        points = {c.trial_id: (c.label, {k: rows[c.trial_id][k] for k in PARAMS}) for c in schedules}
        self.judgement_runs = [f"judge-{trial}-s{seed}" for trial in points for seed in seeds]
        return retrain(self.cfg, self.shards, points, seeds, uri, parent, max_concurrent(self.cfg, self.cpus_per_trial))

    def outcome(self, best: dict, best_yaml: Path) -> tuple[Config, str, Path | None]:
        """The best trial's config, the command that uses it, its last sample grid."""
        grids = sorted((Path(self.cfg.run_dir) / "trials" / best["trial_id"] / "samples").glob("step_*.png"))
        return apply_point(self.cfg, best), f"ncsn-pipeline train --config {best_yaml}", grids[-1] if grids else None


class SamplerSearch:
    """Each trial samples a trained checkpoint once with its first σ level (the levels from start_level on), ε and
    sampler setting (Algorithm 1 with T steps per level, predictor–corrector, Euler or Heun on an N-level grid), within
    tune.max_nfe network evaluations per image."""

    label = "sampler"
    keys = ("start_level", "eps", "sampler")
    max_t = None  # one report per trial: nothing to stop early
    cpus_per_trial = 1.0
    judgement_runs: list[str] = []  # the verdict trains nothing: it samples the one checkpoint

    def __init__(self, cfg: Config, checkpoint: str):
        self.cfg, self.checkpoint, self.source = cfg, checkpoint, open_checkpoint(checkpoint)  # read once, shipped to the trials
        ckpt = self.source.checkpoint
        self.levels_only = ckpt.model_config.levels_only
        trained = ckpt.schedule  # ε and T the config's where the checkpoint does not record them
        self.schedule = replace(trained, eps=trained.eps if trained.eps is not None else cfg.sampling.eps,
                                steps_per_level=trained.steps_per_level if trained.steps_per_level is not None else cfg.sampling.steps_per_level)
        self.sigmas = list(self.schedule.sigmas)
        self.rec = {"start_level": 0, "eps": self.schedule.eps, "sampler": setting_text(self.schedule)}
        self.settings = sampler_settings(cfg, self.schedule, self.levels_only, self.rec["sampler"])  # checks the budget, before Ray

    def space(self) -> dict:
        t = self.cfg.tune
        return {"start_level": tune.randint(0, max(1, len(self.sigmas) // 2) + 1),
                "eps": tune.loguniform(self.rec["eps"] * t.eps_scale[0], self.rec["eps"] * t.eps_scale[1] * (1 + 1e-9)),
                "sampler": tune.choice(self.settings)}

    def describe(self) -> str:
        """The job's trials, search space and budget, as `tune --dry-run` prints them."""
        t = self.cfg.tune
        costs = ", ".join(f"{s} ({setting_nfe(s, self.schedule, self.levels_only)})" for s in self.settings)
        return (f"tune the sampler of {self.checkpoint}: {t.trials} trials (the first its own: {self.rec['sampler']}, ε "
                f"{self.rec['eps']:.3g}), each {t.metric} of {t.eval_samples} samples on the validation split.\nsearched: the "
                f"first σ level 0 … {max(1, len(self.sigmas) // 2)} of {len(self.sigmas)}, ε × {t.eps_scale}, and the sampler "
                f"(network evaluations per image{f', at most {t.max_nfe}' if t.max_nfe else ''}): {costs}.\nthen: the best "
                f"{t.select_top} and the checkpoint's own re-scored on {t.confirm_seeds} seeds × {t.confirm_samples} samples "
                f"(validation); {t.finalists} finalist(s) judged on the test split, the sampling seed as the unit")

    def point(self, config: dict) -> dict:
        """A trial's row columns: its point, with its T and its network evaluations per image."""
        schedule = self.schedule_of(config)
        return {**{k: config.get(k) for k in self.keys}, "steps_per_level": schedule.steps_per_level,
                "nfe": nfe(schedule, self.levels_only)}

    def schedule_of(self, config: dict) -> Schedule:
        """The checkpoint's schedule as a trial samples it."""
        schedule = setting_schedule(config["sampler"], self.schedule)
        return schedule.from_level(int(config["start_level"]), float(config["eps"]), schedule.steps_per_level)

    def trainable(self, uri: str, parent: str, objective: ObjectiveSpec):
        return tune.with_resources(tune.with_parameters(sampler_trial, base=self.cfg, checkpoint=self.checkpoint, payload=self.source.payload,
                                                        uri=uri, parent_run_id=parent, rec=self.rec, objective=objective), {"CPU": 1})

    def scheduler(self, history: Path):
        """FIFO: one report per trial, so nothing to stop early and no rungs to keep (``history`` is not written)."""
        return FIFOScheduler()

    def checkpoints(self, rows: list[dict], uri: str, parent: str) -> Callable[[dict], str | None]:
        """The checkpoint, for each row the selection may take: those within tune.max_nfe and the checkpoint's own
        setting. (That setting is among Tune's choices, as its first trial must be; a searched trial that drew it above
        the budget is no candidate.)"""
        budget = self.cfg.tune.max_nfe
        return lambda row: self.checkpoint if budget is None or row["label"] == "recommended" or row["nfe"] <= budget else None

    def networks(self, schedules: list[Candidate], rows: dict[str, dict], uri: str, parent: str) -> dict[str, list[str]]:
        """One network, the tuned checkpoint: the unit of the verdict is the sampling seed."""
        return {c.trial_id: [self.checkpoint] for c in schedules}

    def outcome(self, best: dict, best_yaml: Path) -> tuple[Config, str, Path | None]:
        """The config with the best sampler settings, the `sample` command that uses them, the trial's grid."""
        schedule = self.schedule_of(best)
        sampler, out = schedule.sampler, Path(self.cfg.run_dir).parent / "best" / "samples"
        command = (f"ncsn-pipeline sample --checkpoint {self.checkpoint} --num-samples {self.cfg.sampling.num_samples} --output {out} "
                   f"--eps {best['eps']:.6g} --steps-per-level {schedule.steps_per_level} {sampler_flags(sampler, self.schedule.sampler)}"
                   + (f" --sigmas {' '.join(f'{x:.6g}' for x in schedule.sigmas)}" if best["start_level"] else ""))
        best_cfg = self.cfg.evolve({"sampling.eps": float(best["eps"]), "sampling.steps_per_level": int(schedule.steps_per_level),
                                    "sampling.sampler": sampler.name, "sampling.sampler_steps": sampler.steps,
                                    "sampling.corrector_steps": sampler.corrector_steps, "sampling.snr": sampler.snr,
                                    "sampling.rho": sampler.rho, "sampling.churn": sampler.churn, "sampling.s_tmin": sampler.s_tmin,
                                    "sampling.s_tmax": sampler.s_tmax, "sampling.s_noise": sampler.s_noise})
        return best_cfg, command, Path(best["grid"]) if best["grid"] else None

"""σ-schedule tuning with Ray Tune on digits, tiny budget: ASHA, nested MLflow runs, best YAML, driver restart, and the
verdict: selection on the validation split, judgement on the test split over retrained networks."""
import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.train import prepare
from pipelines.tune.job import run_tuning
from tests.servers import only_ray_instance

ROOT = Path(__file__).resolve().parents[1]
# 4 trials of 20 steps, the objective every 10 steps (ASHA's rung at step 10), 100 samples per evaluation; ASHA keeps the top third.
# The selection re-scores the best finished trial and `recommended` on 2 seeds; the judgement (retraining) is tested on its own.
STEPS = 20
TINY = [f"train.steps={STEPS}", "train.batch_size=32", "data.loader_workers=0", "tracking.system_metrics=false", "tune.trials=4",
        "tune.eval_every=10", "tune.eval_samples=100", "tune.steps_per_level=[2,3]", "sampling.steps_per_level=2",
        "tune.reduction_factor=3", "tune.select_top=1", "tune.confirm_train_seeds=0", "tune.confirm_seeds=2", "tune.confirm_samples=60"]


def _tune_command(run_dir: Path, shards: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(Path(sys.executable).parent / "ncsn-pipeline"), "tune", "--config", str(ROOT / "configs" / "digits.yaml"),
            "--shards", shards, "--set", f"run_dir={run_dir}", *[a for s in TINY for a in ("--set", s)], *extra]


def _tune(run_dir: Path, shards: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The tuning command in a user's environment: no RAY_ADDRESS, nor the variable that keeps Ray on loopback (the CLI
    sets it itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    return subprocess.run(_tune_command(run_dir, shards, extra), capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def _a_trial_finished_training(run_dir: Path) -> bool:
    """Some trial's metrics.jsonl has its last step (train.steps): that trial is done or about to be reported done."""
    for rows in (run_dir / "tune" / "trials").glob("*/metrics.jsonl"):
        if any(line.startswith(f'{{"step": {STEPS},') for line in rows.read_text().splitlines()):
            return True
    return False


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "tune" / "tune_results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, digits_shards, eval_cache):
    """A 4-trial job whose driver and its local Ray are killed (SIGKILL, from outside) once a trial has finished
    training, then restarted with the same command."""
    import signal

    import psutil

    from tests.servers import wait_for

    run_dir, shared = tmp_path_factory.mktemp("tune") / "run", ("--set", f"evaluation.cache_dir={eval_cache}")
    with only_ray_instance():
        with open(run_dir.parent / "first.log", "w") as log:
            first = subprocess.Popen(_tune_command(run_dir, digits_shards, shared), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                wait_for(lambda: _a_trial_finished_training(run_dir) or first.poll() is not None, 600, "a finished trial", every=0.5)
                assert first.poll() is None, (run_dir.parent / "first.log").read_text()[-3000:]  # still running: kill it
                local_ray = psutil.Process(first.pid).children(recursive=True)
                first.send_signal(signal.SIGKILL)
            finally:
                first.wait(timeout=60)
        assert first.returncode == -signal.SIGKILL
        for process in local_ray:  # the driver's local Ray goes with it at once, as with a lost head node
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(local_ray, timeout=30)
        second = _tune(run_dir, digits_shards, shared)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, first, second


def test_restarted_driver_resumes_the_job_instead_of_starting_over(tuned):
    run_dir, _, second = tuned
    assert "resuming the tuning job" in second.stderr
    assert "started a local Ray on 127.0.0.1 (set RAY_ADDRESS to join a cluster)" in second.stderr
    rows = _rows(run_dir)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4  # 4 trials in all, not 4 more
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("ncsn").experiment_id], "attributes.run_name = 'digits-tune'")
    assert len(parent) == 1  # one parent run across the restart
    # `recommended` is the first trial and the best at every evaluation (ASHA never stops it): it finishes training as
    # the driver dies, and resumed, its last report is Tune's iteration 1 of the new session; not stopped early for that
    (rec,) = [r for r in rows if r["label"] == "recommended"]
    assert rec["stopped_early"] == "False" and rec["last_step"] == str(STEPS), rows


def test_asha_stops_a_trial_and_the_recommended_schedule_is_a_labelled_trial(tuned):
    run_dir, _, second = tuned
    rows = _rows(run_dir)
    assert [r["label"] for r in rows].count("recommended") == 1
    # `recommended`'s KID at step 10 is far below every other trial's (3.4 against 12 and more), so at rung 10 ASHA stops
    # at least the two trials that start after the first pair, whether before or after the restart (its rungs kept)
    assert sum(r["stopped_early"] == "True" for r in rows) >= 2, rows
    assert "stopped early by ASHA" in second.stdout and "recommended schedule:" in second.stdout


def test_parent_and_child_mlflow_runs_are_nested_with_params_curves_and_results(tuned):
    run_dir, _, _ = tuned
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ncsn").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'digits-tune'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rows = {r["trial_id"]: r for r in _rows(run_dir)}
    trials = [c for c in children if c.data.params["tune.trial_id"] in rows]
    assert len({c.data.params["tune.trial_id"] for c in trials}) == len(trials) == 4
    for child in trials:
        assert child.info.status == ("KILLED" if rows[child.data.params["tune.trial_id"]]["stopped_early"] == "True" else "FINISHED")
        assert "kid_std_classifier" in child.data.metrics and child.data.params["schedule.recommend"] == "False"
    # a trial the killed driver had started but not yet saved in Tune's state runs again under a new id: its first run
    # is closed as KILLED; the only other extra child is the recommended schedule trained to the end (below)
    others = [c for c in children if c.data.params["tune.trial_id"] not in rows]
    assert all(c.info.status == "KILLED" or c.data.params["tune.trial_id"] == "recommended-full" for c in others)
    assert "best_kid_std_classifier" in parent.data.metrics and "recommended_kid_std_classifier" in parent.data.metrics
    assert "validation_recommended_kid_std_classifier" in parent.data.metrics
    # the recommended schedule is always re-scored: when ASHA stopped its trial, it is trained to the end after the search
    (rec,) = [r for r in _rows(run_dir) if r["label"] == "recommended"]
    assert rec["selection_mean"] != ""
    full = [c for c in children if c.data.params["tune.trial_id"] == "recommended-full"]
    # (a stopped trial may still have trained to the end before Tune's stop reached it: then it is confirmed as it is)
    assert len(full) <= (rec["stopped_early"] == "True") and all(c.info.status == "FINISHED" for c in full)
    # tune.select_top=1: the finished trial of lowest search objective and `recommended` (one trial when they are the same)
    finished = [r for r in rows.values() if (r["stopped_early"] == "False" and not r["error"]) or r["label"] == "recommended"]
    best = min(finished, key=lambda r: float(r["objective"]))
    selected = {t for t, r in rows.items() if r["selection_mean"] != ""}
    assert selected == {best["trial_id"], rec["trial_id"]}, rows
    assert parent.data.tags["tune.verdict"].startswith("the selection (re-scored on the validation split) ranked ")
    assert "not judged on the test split (tune.confirm_train_seeds=0" in parent.data.tags["tune.verdict"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/tune_results.csv", "tune/plots", "tune/best", "tune/verdict"} <= artifacts


def test_best_config_holds_the_selected_schedule_and_passes_trainings_checks(tuned, tmp_path, digits_shards):
    # The YAML spells out the schedule and sampler the selection ranked first (no longer `recommend`), and it passes every
    # check training makes on the driver against the shards (a config that passes them trains: test_train_ray.py)
    run_dir, _, _ = tuned
    best = min((r for r in _rows(run_dir) if r["selection_mean"] != ""), key=lambda r: float(r["selection_mean"]))
    cfg = load_config(run_dir / "tune" / "best_config.yaml", [f"run_dir={tmp_path}"])
    assert not cfg.schedule.recommend
    schedule = prepare(cfg, digits_shards).schedule
    assert len(schedule.sigmas) == int(best["num_levels"]) and schedule.steps_per_level == int(best["steps_per_level"])
    assert (schedule.sigmas[0], schedule.sigmas[-1], schedule.eps) == pytest.approx((float(best["sigma_max"]), float(best["sigma_min"]),
                                                                                    float(best["eps"])))


def test_sampler_only_tuning_selects_on_validation_and_judges_on_test(tmp_path, trained_digits, digits_shards, eval_cache,
                                                                      monkeypatch):
    # Every score the job computes is recorded with the split it was computed against: the search's trials and the
    # selection use the validation split, the judgement only the test split, and only after the finalist was chosen.
    import pipelines.tune.job as tuning

    _, schedule, checkpoint = trained_digits
    calls, real = [], tuning.score_all
    monkeypatch.setattr(tuning, "score_all", lambda jobs, objective, *a: calls.append((objective.reference_split, [c.trial_id for _, c in jobs]))
                        or real(jobs, objective, *a))
    # Algorithm 1 with T = 2 or 3, Euler and Heun on 6- or 11-level grids, within 50 network evaluations per image: the
    # checkpoint's own setting (21 levels × T = 10 + 1 = 211) is the reference, every searched trial keeps to the budget.
    cfg = load_config(ROOT / "configs" / "digits.yaml", [f"run_dir={tmp_path}", "tune.trials=4", "tune.eval_samples=60",
                                                         "tune.select_top=2", "tune.confirm_seeds=3", "tune.confirm_samples=60",
                                                         "tune.steps_per_level=[2,3]", "tune.samplers=[als,euler,heun]",
                                                         "tune.sampler_steps=[6,11]", "tune.max_nfe=50", "tracking.system_metrics=false",
                                                         f"evaluation.cache_dir={eval_cache}"])
    summary = run_tuning(cfg, digits_shards, checkpoint=str(checkpoint))
    rows = summary.rows
    assert len(rows) == 4 and all(r["objective_low"] <= r["objective"] <= r["objective_high"] for r in rows)
    (rec,) = [r for r in rows if r["label"] == "recommended"]  # the checkpoint's own sampler settings, whole schedule
    assert rec["start_level"] == 0 and rec["steps_per_level"] == schedule.steps_per_level
    assert rec["sampler"] == f"als:T={schedule.steps_per_level}" and rec["nfe"] == len(schedule.sigmas) * schedule.steps_per_level + 1
    assert rec["eps"] == pytest.approx(schedule.eps)
    allowed = {"als:T=2": 43, "euler:N=6": 6, "euler:N=11": 11, "heun:N=6": 11, "heun:N=11": 21,  # als:T=3 takes 64
               "heun:N=6,churn=40": 11, "heun:N=11,churn=40": 21, "heun:N=6,churn=40,s_noise=0.8": 11,
               "heun:N=11,churn=40,s_noise=0.8": 21}
    searched = [r for r in rows if r["label"] == "search"]
    for r in searched:  # start_level > 0 shortens Algorithm 1; the reference's own setting (a choice Tune needs) is no candidate
        assert (r["sampler"] in allowed and r["nfe"] <= allowed[r["sampler"]]) or (r["sampler"] == rec["sampler"] and r["selection_mean"] is None)
    (finalist,) = [r for r in rows if r["finalist"]]  # the best searched trial by its validation mean
    assert finalist["selection_mean"] == min(r["selection_mean"] for r in rows if r["label"] == "search" and r["selection_mean"] is not None)
    (selection, selected), (judgement, judged) = calls
    assert selection == "validation" and judgement == "test" and set(judged) == {finalist["trial_id"], rec["trial_id"]}
    assert set(selected) == {r["trial_id"] for r in rows if r["selection_mean"] is not None}
    assert finalist["test_mean"] is not None and finalist["gap_low"] <= finalist["gap_vs_recommended"] <= finalist["gap_high"]
    assert "over 3 sampling seeds of one network" in summary.verdict and "paired t, 2 df" in summary.verdict
    best = load_config(summary.best_config)  # the selection's first, whatever the test split says
    assert best.sampling.eps == pytest.approx(summary.best["eps"]) and best.sampling.steps_per_level == summary.best["steps_per_level"]
    assert best.sampling.sampler == summary.best["sampler"].split(":")[0]
    assert summary.best["selection_mean"] == min(r["selection_mean"] for r in rows if r["selection_mean"] is not None)
    assert summary.next_command.startswith(f"ncsn-pipeline sample --checkpoint {checkpoint}")
    assert f"--sampler {best.sampling.sampler}" in summary.next_command
    client = MlflowClient(summary.tracking_uri)
    children = client.search_runs([client.get_run(summary.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert sorted(c.data.params["tune.trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    assert all(c.info.status == "FINISHED" and "kid_std_classifier" in c.data.metrics for c in children)


def test_the_judgement_retrains_each_schedule_on_fresh_seeds_and_scores_them_on_the_test_split(tmp_path, digits_shards, eval_cache):
    # A finalist (the recommended σ_max × 0.6, ε × 2) against `recommended`: both schedules trained again on 2 fresh
    # training seeds to the full budget, each a finished child run of the job; every network scored on the test split,
    # recommended's also with the finalist's sampler (the attribution); the same call again trains nothing.
    from pipelines import tracking
    from pipelines.sample import read_checkpoint
    from pipelines.tune.job import _judgements
    from pipelines.tune.modes import ScheduleSearch
    from pipelines.tune.objective import ObjectiveSpec
    from pipelines.tune.verdict import Candidate

    cfg = load_config(ROOT / "configs" / "digits.yaml", [f"run_dir={tmp_path / 'tune'}", "name=digits-tune", *TINY,
                                                         "tune.confirm_train_seeds=2", f"evaluation.cache_dir={eval_cache}"])
    cfg = cfg.evolve({"tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    mode = ScheduleSearch(cfg, digits_shards)
    uri, parent = tracking.open_run(cfg, {"tune.mode": "schedule"})
    points = {"rec": mode.rec, "fin": {**mode.rec, "sigma_max": mode.rec["sigma_max"] * 0.6, "eps": mode.rec["eps"] * 2}}
    rec, fin = (Candidate(t, label, 0.0, "", 0, points[t]["eps"], points[t]["steps_per_level"])
                for t, label in (("rec", "recommended"), ("fin", "search")))
    (judged,) = _judgements(cfg, mode, [fin], rec, points, uri, parent, ObjectiveSpec.from_config(cfg, digits_shards, "test"))
    assert (judged.unit, judged.units, judged.repeats, judged.df) == ("training run", 2, 2, 1)
    assert judged.sampler_part is not None and judged.gap.value == pytest.approx(judged.sampler_part.value + judged.schedule_part.value)
    client = MlflowClient(uri)
    runs = {r.data.params["tune.trial_id"]: r for r in client.search_runs([client.get_run(parent).info.experiment_id],
                                                                        f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(runs) == set(mode.judgement_runs) == {"judge-rec-s1000", "judge-rec-s1001", "judge-fin-s1000", "judge-fin-s1001"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["train.seed"] == name[-4:]
        ckpt = read_checkpoint(str(tmp_path / "tune" / "trials" / name / "model" / "checkpoint.pt"))[0]
        assert ckpt.step == STEPS and float(ckpt.sigmas[0]) == pytest.approx(points[name.split("-")[1]]["sigma_max"], rel=1e-5)
    again = mode.networks([rec, fin], points, uri, parent)  # resumed job: the finished runs are kept, nothing retrained
    assert len(client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 4
    assert [Path(p).parent.parent.name for p in again["fin"]] == ["judge-fin-s1000", "judge-fin-s1001"]


def test_a_search_space_without_a_valid_trial_is_refused_before_ray_starts(tmp_path, digits_shards):
    # σ_max at most 0.001 × the recommended 4.8, below every σ_min the space allows: every searched trial would fail and
    # `recommended`, the only one to train, would be called the best. One line, exit 1, nothing started or written.
    out = subprocess.run(_tune_command(tmp_path / "run", digits_shards, ("--set", "tune.sigma_max_scale=[0.001,0.001]")),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("ncsn-pipeline tune: error: tune.sigma_max_scale [0.001, 0.001] × the "
                                                          "recommended σ_1")
    assert "no searched trial could train" in out.stderr and not (tmp_path / "run" / "tune").exists()


def test_a_budget_no_sampler_keeps_to_is_refused_before_ray_starts(tmp_path):
    # 21 trained levels: Algorithm 1 takes at least 21·1 + 1 evaluations, Heun on a 6-level grid 11; a budget of 10 admits none.
    from ncsn.checkpoint import Checkpoint, save_checkpoint
    from ncsn.models import ModelConfig, ScoreNetwork
    from ncsn.sigmas import Schedule, geometric_sigmas
    from pipelines.config import ConfigError
    from pipelines.tune.modes import SamplerSearch

    sigmas = geometric_sigmas(4.6, 0.01, 21)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 16), sigmas)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(model.config, Schedule(sigmas, 3e-5, 10), model.state_dict(), None, None, 1))
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["tune.steps_per_level=[1]", "tune.samplers=[als,heun]",
                                                         "tune.sampler_steps=[6]", "tune.max_nfe=10"])
    with pytest.raises(ConfigError, match=r"tune.max_nfe 10 admits none of tune.samplers \['als', 'heun'\] \(the cheapest takes 11"):
        SamplerSearch(cfg, str(tmp_path / "c.pt"))
    settings = SamplerSearch(cfg.evolve({"tune.max_nfe": 22}), str(tmp_path / "c.pt")).settings
    # by NFE (11, 22), and the checkpoint's own; churn's S_noise over tune.s_noise
    assert settings == ["heun:N=6", "heun:N=6,churn=40", "heun:N=6,churn=40,s_noise=0.8", "als:T=1", "als:T=10"]
    # A model trained on its levels alone takes no churn: heun is searched at churn 0 only, or refused when that is not listed.
    ncsn = ScoreNetwork(ModelConfig("ncsn", 8, 1, 16), sigmas)
    save_checkpoint(tmp_path / "n.pt", Checkpoint(ncsn.config, Schedule(sigmas, 3e-5, 10), ncsn.state_dict(), None, None, 1))
    assert SamplerSearch(cfg.evolve({"tune.max_nfe": 22}), str(tmp_path / "n.pt")).settings == ["heun:N=6", "als:T=1", "als:T=10"]
    with pytest.raises(ConfigError, match=r"^tune.churn \[40.0\] leaves heun, the only one of tune.samplers, nothing to search"):
        SamplerSearch(cfg.evolve({"tune.samplers": ["heun"], "tune.churn": [40.0]}), str(tmp_path / "n.pt"))


def test_the_printed_sample_command_names_every_setting_of_the_chosen_sampler():
    # The flags, parsed by the real CLI on a checkpoint whose own sampler is `default`, give back the chosen sampler: a
    # setting left out (churn, S_noise, ρ) or left to the checkpoint's (its churn, its S_tmax) would sample otherwise.
    from ncsn.sigmas import Sampler
    from pipelines.cli import build_parser, sampling_options
    from pipelines.tune.modes import sampler_flags

    chosen = (Sampler(), Sampler("pc", steps=20, corrector_steps=0, snr=0.2), Sampler("pc", steps=20), Sampler("euler", steps=10, rho=5.0),
              Sampler("heun", steps=11, churn=40.0, s_tmin=0.02, s_tmax=2.0, s_noise=1.007), Sampler("heun", steps=8),
              Sampler("heun", steps=8, churn=40.0, s_noise=0.8))
    defaults = (Sampler(), Sampler("pc", steps=3, corrector_steps=2), Sampler("heun", steps=11, rho=5.0, churn=40.0, s_tmax=1.0, s_noise=0.9))
    for sampler in chosen:
        for default in defaults:
            flags = sampler_flags(sampler, default)
            options = sampling_options(build_parser().parse_args(["sample", "--checkpoint", "c.pt", "--num-samples", "1", "--output", "o",
                                                                  *flags.split()]))
            assert options.sampler_spec(default) == sampler, (sampler, default, flags)
    assert sampler_flags(Sampler("heun", steps=8, churn=40.0, s_noise=0.8), Sampler()) == "--sampler heun --sampler-steps 8 --churn 40 --s-noise 0.8"


def test_a_job_whose_searched_trials_all_failed_is_an_error():
    # Tune returns a result per trial; when every searched one errored, the job says so instead of naming `recommended`
    # the best of one.
    from types import SimpleNamespace

    from pipelines.tune.job import TuningError, _summarise

    cfg = load_config(ROOT / "configs" / "digits.yaml")
    rec = {"sigma_max": 4.8, "sigma_min": 0.01, "num_levels": 22, "eps": 3e-5, "steps_per_level": 10}
    mode = SimpleNamespace(rec=rec, keys=tuple(rec), max_t=cfg.train.steps, label="schedule", point=lambda c: {k: c.get(k) for k in rec})
    results = [SimpleNamespace(metrics={"kid_std_classifier": 0.4, "step": cfg.train.steps}, path="/t/rec", config=rec, error=None),
               *(SimpleNamespace(metrics={}, path=f"/t/{k}", config={**rec, "sigma_max": 0.005}, error=ValueError("σ_min >= σ_max"))
                 for k in "ab")]
    with pytest.raises(TuningError, match=r"all 2 searched trials failed \(trial a: σ_min >= σ_max\)"):
        _summarise(cfg, results, mode, "uri", "parent", None, "shards")


def test_asha_keeps_its_rungs_across_a_restart_of_the_driver(tmp_path):
    # Tune's restore rebuilds the scheduler as it was at the start (the copy below): the results judged before the restart
    # must still set the cutoffs, and a trial they stopped stays stopped, as if the driver had never died.
    import copy
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pipelines.tune.asha import ResumableASHA

    def started(history):
        asha = ResumableASHA(str(history), max_t=30, grace_period=10, reduction_factor=3)
        asha.set_search_properties("kid", "min")
        return asha

    def judge(asha, trial, step, kid):
        return asha.on_trial_result(None, SimpleNamespace(trial_id=trial), {"step": step, "kid": kid})

    first = started(tmp_path / "asha.jsonl")
    pickled = copy.deepcopy(first)  # tuner.pkl: written at the start
    for trial in "ab":
        first.on_trial_add(None, SimpleNamespace(trial_id=trial))
    assert judge(first, "a", 10, 3.0) == TrialScheduler.CONTINUE  # a's KID is best: it sets rung 10's cutoff
    assert judge(first, "b", 10, 9.0) == TrialScheduler.STOP  # b's stop is lost when the driver dies before saving it
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    empty = started(tmp_path / "none.jsonl")  # what Ray's own restore amounts to: rungs without the earlier results
    for restored, expected in ((pickled, [stop, stop, go]), (empty, [go, go, go])):
        for trial in "abc":
            restored.on_trial_add(None, SimpleNamespace(trial_id=trial))
        verdicts = [judge(restored, "b", 20, 9.5), judge(restored, "c", 10, 8.0), judge(restored, "a", 20, 3.5)]
        assert verdicts == expected, restored.history

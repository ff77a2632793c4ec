import subprocess
import sys
from pathlib import Path


def test_cli_demo_writes_the_mixture_figure(tmp_path):
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "ncsn-pipeline"), "toy-mixture", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mixture.png").stat().st_size > 10_000
    assert "annealed Langevin" in out.stdout


def test_cli_without_command_fails_with_usage():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: ncsn-pipeline" in out.stderr


def test_verbose_is_taken_before_or_after_the_subcommand_and_version_is_printed():
    from importlib.metadata import version

    from pipelines.cli import build_parser

    base = ["sample", "--checkpoint", "c.pt", "--num-samples", "4", "--output", "o"]
    assert build_parser().parse_args(base).verbose is False
    assert build_parser().parse_args(["-v", *base]).verbose is True
    assert build_parser().parse_args([*base, "-v"]).verbose is True
    out = subprocess.run([str(Path(sys.executable).parent / "ncsn-pipeline"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"ncsn-pipeline {version('ncsn-pipeline')}"


def test_print_config_and_dry_run_resolve_the_schedule_and_start_nothing(tmp_path, digits_shards, capsys, monkeypatch):
    import yaml

    import ray

    from data_prep.manifest import load_manifest
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.train import resolve_schedule

    def no_ray(*args, **kwargs):
        raise AssertionError("--print-config and --dry-run must not start or join Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    base = ["train", "--config", config, "--set", f"run_dir={tmp_path}"]
    assert main([*base, "--shards", digits_shards, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    schedule = resolve_schedule(load_config(config), load_manifest(digits_shards))
    sigmas, eps = schedule.sigmas, schedule.eps
    assert printed["resolved"]["sigmas"] == [round(float(s), 6) for s in sigmas] and printed["resolved"]["eps"] == eps
    assert printed["optim"]["lr"] == load_config(config).optim.lr

    assert main([*base, "--shards", digits_shards, "--dry-run", "--set", "cluster.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "on 2 worker(s)" in out and "nothing was started" in out
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    assert main([*base, "--shards", str(tmp_path / "none"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no manifest.json" in err
    assert main([*base, "--print-config"]) == 0  # not sharded yet
    assert f"# resolved: after sharding digits into {tmp_path}" in capsys.readouterr().out


def test_dry_run_makes_the_same_name_check_as_the_real_command(tmp_path, digits_shards, capsys):
    # `run --dry-run --set train.steps=300` said "valid; nothing was started", then the real command refused the changed
    # settings after starting Ray, and on a finished run it said "train for 2500 steps". The dry run now says what
    # opening the run would do, and refuses the same way.
    from pipelines import tracking
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.train import prepare

    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    overrides = [f"run_dir={tmp_path}", "tracking.system_metrics=false"]
    cfg = load_config(config, overrides)
    _, run_id = tracking.open_run(cfg.evolve({"run_dir": str(tmp_path.resolve())}), prepare(cfg, digits_shards).run_params())  # begun before
    base = ["run", "--config", config, "--shards", digits_shards, "--dry-run", *[a for o in overrides for a in ("--set", o)]]

    assert main(base) == 0 and "resumes run 'digits' (MLflow run " in capsys.readouterr().out
    assert main([*base, "--set", "train.steps=300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run 'digits' in" in err[0] and "was started with other settings (train.steps: 2500 → 300)" in err[0]
    assert main([*base, "--set", "train.steps=300", "--resume"]) == 0
    assert "from its latest checkpoint with changed settings: train.steps" in capsys.readouterr().out
    assert main([*base, "--set", "train.steps=300", "--fresh"]) == 0 and "resumes" not in capsys.readouterr().out
    tracking.log_to_run(tracking.tracking_uri(cfg.evolve({"run_dir": str(tmp_path.resolve())})), run_id, {"loss": 9.0}, step=2500)
    assert main(base) == 0 and "has trained all 2500 steps: training would do nothing" in capsys.readouterr().out
    assert not (tmp_path / "ray").exists()  # nothing was started


def test_tune_dry_run_shows_the_trials_search_space_and_budget(tmp_path, digits_shards, capsys):
    # `tune --dry-run` showed the training plan, not the trials; it now says what the job would search and spend.
    from pipelines.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    base = ["tune", "--config", config, "--shards", digits_shards, "--dry-run", "--set", f"run_dir={tmp_path}"]
    assert main([*base, "--set", "tune.trials=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tune the schedule: 5 trials (the first NCSNv2's recommendation: σ_max 4.608, σ_min 0.01, L = 21")
    assert "T in [5, 10, 20]" in out and "nothing was started" in out
    from ncsn.checkpoint import Checkpoint, save_checkpoint
    from ncsn.models import ModelConfig, ScoreNetwork
    from ncsn.sigmas import Schedule, geometric_sigmas

    sigmas = geometric_sigmas(4.6, 0.01, 21)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 16), sigmas)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(model.config, Schedule(sigmas, 3e-5, 10), model.state_dict(), None, None, 1))
    assert main([*base, "--checkpoint", str(tmp_path / "c.pt"), "--set", "tune.samplers=[als,heun]", "--set", "tune.max_nfe=25"]) == 0
    out = capsys.readouterr().out
    assert ("(network evaluations per image, at most 25): heun:N=6 (11), heun:N=6,churn=40 (11), heun:N=6,churn=40,s_noise=0.8 (11), "
            "heun:N=11 (21), heun:N=11,churn=40 (21), heun:N=11,churn=40,s_noise=0.8 (21), als:T=10 (211).") in out
    assert not (tmp_path / "tune").exists()  # nothing was started or written


def test_resume_and_fresh_are_explicit_and_exclusive():
    import pytest

    from pipelines.cli import build_parser

    base = ["train", "--config", "c.yaml"]
    assert [build_parser().parse_args([*base, *flag]).resume for flag in ([], ["--resume"], ["--fresh"])] == ["auto", "accept", "fresh"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--resume", "--fresh"])


def test_every_help_example_parses():
    import shlex

    from pipelines.cli import EXAMPLES, build_parser

    for command, text in EXAMPLES.items():
        for line in text.splitlines():
            words = shlex.split(line.split("#")[0])
            assert words[:2] == ["ncsn-pipeline", command]
            build_parser().parse_args(words[1:])  # SystemExit (a failed test) if an option is wrong


def test_every_long_command_takes_no_progress():
    import shlex

    from pipelines.cli import EXAMPLES, build_parser

    for command in ("shard", "train", "run", "tune", "sample", "inpaint", "evaluate"):
        words = shlex.split(EXAMPLES[command].splitlines()[0].split("#")[0])
        assert build_parser().parse_args([*words[1:], "--no-progress"]).no_progress, command


def test_a_ray_address_whose_head_does_not_answer_is_one_line_within_seconds(tmp_path):
    # RAY_ADDRESS naming a head that went away (a port nothing listens on): one line naming the address, exit 1, in seconds
    # instead of ray.init's wait. (That a command without RAY_ADDRESS starts its own Ray on 127.0.0.1, and one with it says
    # which cluster it joined, is asserted on the tuning job's and the sampling command's output.)
    import os
    import time

    from ncsn.checkpoint import Checkpoint, save_checkpoint
    from ncsn.models import ModelConfig, ScoreNetwork
    from ncsn.sigmas import Schedule, geometric_sigmas
    from tests.servers import free_port

    sigmas = geometric_sigmas(1.0, 0.01, 3)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 16), sigmas)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(model.config, Schedule(sigmas, 1e-4, 1), model.state_dict(), None, None, 1))
    dead = f"127.0.0.1:{free_port()}"
    t = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "ncsn-pipeline"), "sample", "--checkpoint", str(tmp_path / "c.pt"),
                          "--num-samples", "2", "--output", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": dead})
    assert time.monotonic() - t < 60 and out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (f"ncsn-pipeline sample: error: RAY_ADDRESS={dead}: no Ray head answers at "
                                                   f"{dead} within 5 s (Connection refused); start it (`ray start --head`) "
                                                   "or unset RAY_ADDRESS to start a local Ray")


def test_a_relative_run_dir_inside_a_ray_jobs_working_copy_is_warned_about(tmp_path, monkeypatch, caplog):
    from pipelines.cli import _warn_if_job_scratch

    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    _warn_if_job_scratch(str(tmp_path / "runs" / "digits"))  # absolute: stays
    assert not caplog.records
    _warn_if_job_scratch("runs/digits")
    (record,) = caplog.records
    assert record.levelname == "WARNING" and f"writes to {copy / 'runs' / 'digits'}, Ray's copy of the working directory" in record.message

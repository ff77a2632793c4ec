"""Ray Train DDP training on the digits shards: 2 workers on a local Ray (issue 5, first part)."""
import json
from pathlib import Path

import pytest

from data_prep.shard import ShardOptions, load_manifest, shard_dataset
from ncsn.checkpoint import load_checkpoint
from pipelines.config import load_config
from pipelines.train import CHECKPOINT_FILE, resolve_schedule, run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("train") / "shards"
    shard_dataset(ShardOptions("digits", shard_size=300), str(out), progress=False)
    return str(out)


def _config(run_dir: Path, steps: int):
    return load_config(CONFIGS / "digits.yaml", [f"run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=32",
                                                 "train.log_every=5", "train.checkpoint_every=10", "cluster.num_workers=2",
                                                 "data.loader_workers=0"])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_ddp_trains_checkpoints_and_resumes(tmp_path, shards):
    cfg = _config(tmp_path, 20)
    result = run_training(cfg, shards)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    sigmas, _ = resolve_schedule(cfg, load_manifest(shards))
    assert all(f"loss_sigma_{i:03d}" in rows[-1] for i in range(len(sigmas)))
    assert [r["replica_divergence"] for r in rows if "replica_divergence" in r] == [0.0, 0.0]  # replicas identical
    with result.checkpoint.as_directory() as directory:
        ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE, cfg.model, sigmas)
    assert ckpt.step == 20 and ckpt.ema is not None and ckpt.optimizer["state"]

    # Same name, more steps: continues from step 20 with the saved optimiser state instead of starting over.
    resumed = run_training(_config(tmp_path, 30), shards)
    assert [r["step"] for r in _metrics(tmp_path)] == [5, 10, 15, 20, 25, 30]
    with resumed.checkpoint.as_directory() as directory:
        assert load_checkpoint(Path(directory) / CHECKPOINT_FILE).step == 30


def test_killed_worker_is_replaced_and_training_finishes_with_each_step_once(tmp_path, shards, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("NCSN_INJECT_WORKER_FAILURE", f"17:1:{marker}")  # rank 1 dies at step 17, after checkpoint 10, log 15
    result = run_training(_config(tmp_path, 20), shards)
    assert marker.exists()  # the failure happened
    assert [r["step"] for r in _metrics(tmp_path)] == [5, 10, 15, 20]  # step 15 replayed after restore, logged once
    with result.checkpoint.as_directory() as directory:
        assert load_checkpoint(Path(directory) / CHECKPOINT_FILE).step == 20


def test_config_that_does_not_fit_the_shards_fails_before_training(tmp_path, shards):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="do not match the shards' images 8×8×1"):
        run_training(load_config(CONFIGS / "digits.yaml", ["model.image_size=32", f"run_dir={tmp_path}"]), shards)
    with pytest.raises(ConfigError, match=r"train.batch_size \(30\) must be divisible by cluster.num_workers \(4\)"):
        run_training(load_config(CONFIGS / "digits.yaml", ["train.batch_size=30", "cluster.num_workers=4", f"run_dir={tmp_path}"]), shards)


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    import subprocess
    import sys

    cli = Path(sys.executable).parent / "ncsn-pipeline"
    out = subprocess.run([str(cli), "train", "--config", str(CONFIGS / "digits.yaml"), "--set", "train.lrr=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("ncsn-pipeline train: error: unknown key train.lrr")

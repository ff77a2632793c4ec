
import pytest
import torch

from ncsn.checkpoint import Checkpoint, CheckpointError, RunRef, load_checkpoint, save_checkpoint
from ncsn.ema import EMA
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import Schedule, geometric_sigmas

CONFIG = ModelConfig("ncsn", 8, 1, 8)
SIGMAS = geometric_sigmas(1.0, 0.01, 5)


def _trained_checkpoint():
    torch.manual_seed(0)
    model = ScoreNetwork(CONFIG, SIGMAS)
    ema = EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        loss = model(torch.rand(4, 1, 8, 8), SIGMAS[[0, 1, 2, 3]]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    ckpt = Checkpoint(CONFIG, Schedule(SIGMAS, 2e-5, 7, denoise=False), model.state_dict(), ema.state_dict(), opt.state_dict(), step=2,
                      run=RunRef("sqlite:///mlflow.db", "abc123"))
    return model, ema, opt, ckpt


def test_round_trip_gives_identical_outputs_and_optimizer_state(tmp_path):
    model, ema, opt, ckpt = _trained_checkpoint()
    path = save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    loaded = load_checkpoint(path, expect_model_config=CONFIG, expect_sigmas=SIGMAS)
    x, s = torch.rand(3, 1, 8, 8), SIGMAS[[0, 2, 4]]
    with torch.no_grad():
        assert torch.equal(loaded.build_model(use_ema=False)(x, s), model(x, s))
        assert torch.equal(loaded.build_model(use_ema=True)(x, s), ema.model(x, s))
        assert not torch.equal(ema.model(x, s), model(x, s))
    opt2 = torch.optim.Adam(loaded.build_model(use_ema=False).parameters(), 1e-3)
    opt2.load_state_dict(loaded.optimizer)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert loaded.step == 2 and loaded.run == RunRef("sqlite:///mlflow.db", "abc123")
    assert loaded.schedule == Schedule(SIGMAS, 2e-5, 7, denoise=False) and torch.equal(loaded.sigmas, SIGMAS)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_truncated_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", _trained_checkpoint()[3])
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match=rf"{name} is corrupt, truncated or not a checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ncsn-pipeline checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "ncsn-pipeline/checkpoint/1", "model": _Evil()}, tmp_path / "evil.pt", pickle_protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt is corrupt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_a_format_1_checkpoint_reads_with_its_sampler_settings_and_run(tmp_path):
    # format 1 kept σs apart and ε, T, denoise and the MLflow run in a free-form dict
    _, _, _, ckpt = _trained_checkpoint()
    torch.save({"format": "ncsn-pipeline/checkpoint/1", "model_config": CONFIG.to_dict(), "sigmas": SIGMAS, "model": ckpt.model,
                "ema": ckpt.ema, "optimizer": ckpt.optimizer, "step": 2,
                "extra": {"run": "old", "eps": 3e-5, "steps_per_level": 4, "tracking_uri": "http://127.0.0.1:5000", "mlflow_run_id": "r1"}},
               tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt", expect_model_config=CONFIG, expect_sigmas=SIGMAS)
    assert loaded.schedule == Schedule(SIGMAS, 3e-5, 4, denoise=True) and loaded.run == RunRef("http://127.0.0.1:5000", "r1")


def test_ill_typed_schedule_or_run_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", _trained_checkpoint()[3])
    raw = torch.load(path, weights_only=True)
    bad = {"eps": ("schedule", {**raw["schedule"], "eps": float("nan")}, r"schedule eps must be a finite number > 0, got nan"),
           "steps": ("schedule", {**raw["schedule"], "steps_per_level": 2.5}, r"steps_per_level must be an integer >= 1, got 2.5"),
           "sigmas": ("schedule", {**raw["schedule"], "sigmas": [1.0, 0.5]}, r"sigmas must be a non-empty 1-D float tensor"),
           "run": ("run", {"run_id": 7}, r"run must name a tracking_uri and a run_id")}
    for name, (key, value, message) in bad.items():
        torch.save({**raw, key: value}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=rf"{name}.pt: .*{message}"):
            load_checkpoint(tmp_path / f"{name}.pt")


def test_mismatched_config_or_schedule_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", _trained_checkpoint()[3])
    with pytest.raises(CheckpointError, match=r"model.ngf: checkpoint 8, config 16"):
        load_checkpoint(path, expect_model_config=ModelConfig("ncsn", 8, 1, 16))
    with pytest.raises(CheckpointError, match="different noise schedule.*L=5.*L=10"):
        load_checkpoint(path, expect_sigmas=geometric_sigmas(1.0, 0.01, 10))

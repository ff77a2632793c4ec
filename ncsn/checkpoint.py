"""One self-describing checkpoint format: model config, schedule, weights, EMA, optimiser, step, MLflow run."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ncsn._checks import first_line, noise_schedule, positive, positive_int
from ncsn.atomic import atomic_write
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import Sampler, Schedule

FORMAT = "ncsn-pipeline/checkpoint/2"  # 2: typed schedule and run fields (1: σs, with ε, T and the run in a free-form dict)
READABLE = (FORMAT, "ncsn-pipeline/checkpoint/1")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


@dataclass(frozen=True)
class RunRef:
    """The MLflow run a checkpoint belongs to (where sample, inpaint and evaluate log what they make of it)."""

    tracking_uri: str
    run_id: str


@dataclass
class Checkpoint:
    """Everything needed to resume training or to sample."""

    model_config: ModelConfig
    schedule: Schedule
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    step: int = 0
    run: RunRef | None = None

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.tensor()

    def build_model(self, use_ema: bool = True) -> ScoreNetwork:
        """A ScoreNetwork with the EMA weights (if present and ``use_ema``) or the raw weights."""
        model = ScoreNetwork(self.model_config, self.sigmas)
        state = self.ema if (use_ema and self.ema is not None) else self.model
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint weights do not fit its model config {self.model_config}: {err}") from None
        return model


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model_config": ckpt.model_config.to_dict(),
        "schedule": {**asdict(ckpt.schedule), "sigmas": ckpt.sigmas},
        "model": ckpt.model,
        "ema": ckpt.ema,
        "optimizer": ckpt.optimizer,
        "step": int(ckpt.step),
        "run": asdict(ckpt.run) if ckpt.run is not None else None,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp), durable=True)
    return path


def load_checkpoint(
    path: str | os.PathLike | bytes,
    expect_model_config: ModelConfig | None = None,
    expect_sigmas: torch.Tensor | None = None,
    map_location: str | torch.device = "cpu",
    name: str | None = None,
) -> Checkpoint:
    """Read a checkpoint (a file, or its bytes named ``name`` in messages) with ``weights_only=True`` (no code runs),
    checking it against what is expected."""
    source = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    path = name or ("<checkpoint bytes>" if isinstance(path, bytes) else source)
    if isinstance(source, Path) and not source.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a checkpoint: {first_line(err)}") from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path} is not an ncsn-pipeline checkpoint (format {found!r}, expected {FORMAT!r})")
    if raw["format"] != FORMAT:
        raw = _from_format_1(raw)
    try:
        config = ModelConfig(**raw["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model_config: {err}") from None
    missing = [k for k in ("schedule", "model", "ema", "optimizer", "step", "run") if k not in raw]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    schedule, run = _schedule(raw["schedule"], path), _run(raw["run"], path)
    for key in ("model", "ema"):
        if not (raw[key] is None and key == "ema") and not (isinstance(raw[key], dict) and all(isinstance(v, torch.Tensor) for v in raw[key].values())):
            raise CheckpointError(f"checkpoint {path}: {key} must be a state dict of tensors")
    if isinstance(raw["step"], bool) or not isinstance(raw["step"], int) or raw["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: step must be an integer >= 0, got {raw['step']!r}")
    ckpt = Checkpoint(config, schedule, raw["model"], raw["ema"], raw["optimizer"], raw["step"], run)
    if expect_model_config is not None and expect_model_config != config:
        diffs = [
            f"model.{k}: checkpoint {v!r}, config {getattr(expect_model_config, k)!r}"
            for k, v in config.to_dict().items()
            if getattr(expect_model_config, k) != v
        ]
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + "; ".join(diffs))
    if expect_sigmas is not None and (
        expect_sigmas.shape != ckpt.sigmas.shape or not torch.allclose(expect_sigmas.float().cpu(), ckpt.sigmas.float(), rtol=1e-5)
    ):
        raise CheckpointError(
            f"checkpoint {path} was trained on a different noise schedule: checkpoint has L={ckpt.sigmas.numel()}, "
            f"σ_1={ckpt.sigmas[0].item():.4g}, σ_L={ckpt.sigmas[-1].item():.4g}; config has L={expect_sigmas.numel()}, "
            f"σ_1={expect_sigmas[0].item():.4g}, σ_L={expect_sigmas[-1].item():.4g}"
        )
    return ckpt


def _from_format_1(raw: dict) -> dict:
    """A format-1 checkpoint's fields as format 2 has them: ε, T, denoise and the MLflow run came in a free-form dict."""
    extra = raw.get("extra") if isinstance(raw.get("extra"), dict) else {}
    run = ({"tracking_uri": extra["tracking_uri"], "run_id": extra["mlflow_run_id"]}
           if extra.get("tracking_uri") and extra.get("mlflow_run_id") else None)
    schedule = {"sigmas": raw.get("sigmas"), "eps": extra.get("eps"), "steps_per_level": extra.get("steps_per_level"),
                "denoise": extra.get("denoise", True)}
    return {**raw, "schedule": schedule, "run": run}


def _schedule(raw: object, path: object) -> Schedule:
    """The checkpoint's schedule, checked: a valid σ sequence, ε a finite number > 0, T an integer >= 1 (or not recorded)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path}: schedule must be a dict, got {type(raw).__name__}")
    try:
        noise_schedule(raw.get("sigmas"), "sigmas")
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    eps, steps, denoise = raw.get("eps"), raw.get("steps_per_level"), raw.get("denoise", True)
    try:
        if eps is not None:
            positive("schedule eps", eps)
        if steps is not None:
            positive_int("schedule steps_per_level", steps)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    if not isinstance(denoise, bool):
        raise CheckpointError(f"checkpoint {path}: schedule denoise must be true or false, got {denoise!r}")
    sampler = raw.get("sampler", {})  # absent before the samplers came: annealed Langevin, the only one then
    try:
        sampler = Sampler(**sampler)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: schedule sampler {sampler!r}: {first_line(err)}") from None
    return Schedule(raw["sigmas"], None if eps is None else float(eps), steps, denoise, sampler)


def _run(raw: object, path: object) -> RunRef | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("tracking_uri", "run_id")):
        raise CheckpointError(f"checkpoint {path}: run must name a tracking_uri and a run_id, got {raw!r}")
    return RunRef(raw["tracking_uri"], raw["run_id"])

"""One self-describing checkpoint format: config, schedule, weights, EMA, optimiser, step, RNG."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ncsn._checks import noise_schedule
from ncsn.atomic import atomic_write
from ncsn.models import ModelConfig, ScoreNetwork

FORMAT = "ncsn-pipeline/checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    """Everything needed to resume training or to sample."""

    model_config: ModelConfig
    sigmas: torch.Tensor
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    step: int = 0
    extra: dict = field(default_factory=dict)

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
        "sigmas": ckpt.sigmas.detach().cpu(),
        "model": ckpt.model,
        "ema": ckpt.ema,
        "optimizer": ckpt.optimizer,
        "step": int(ckpt.step),
        "extra": ckpt.extra,
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a checkpoint: {first}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path} is not an ncsn-pipeline checkpoint (format {found!r}, expected {FORMAT!r})")
    try:
        config = ModelConfig(**raw["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model_config: {err}") from None
    missing = [k for k in ("sigmas", "model", "ema", "optimizer", "step", "extra") if k not in raw]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    sigmas = raw["sigmas"]
    try:
        noise_schedule(sigmas, "sigmas")
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    for key in ("model", "ema"):
        if not (raw[key] is None and key == "ema") and not (isinstance(raw[key], dict) and all(isinstance(v, torch.Tensor) for v in raw[key].values())):
            raise CheckpointError(f"checkpoint {path}: {key} must be a state dict of tensors")
    if isinstance(raw["step"], bool) or not isinstance(raw["step"], int) or raw["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: step must be an integer >= 0, got {raw['step']!r}")
    ckpt = Checkpoint(config, sigmas, raw["model"], raw["ema"], raw["optimizer"], raw["step"], raw["extra"] or {})
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

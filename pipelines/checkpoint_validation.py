"""Every training checkpoint scored off the training workers, by Ray Train's checkpoint validation: a Ray task samples
``evaluation.checkpoint_samples`` images with the checkpoint's EMA network and sampler and scores them against the
**validation** split (KID with its 95% interval, FID), while training goes on. The checkpoint becomes an MLflow
LoggedModel of the training run (a pyfunc that samples, at its step) with those metrics linked to it, and Ray Train keeps
the best checkpoint by that KID beside the latest; the first 100 samples are the run's sample grid at that step (so rank 0
draws none). Choosing the best is a selection on validation: the test split judges it afterwards (``run``'s evaluation)."""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ncsn._checks import first_line
from ncsn.checkpoint import Checkpoint, load_checkpoint
from ncsn.images import save_image_grid
from pipelines import tracking
from pipelines.train_worker import CHECKPOINT_FILE
from pipelines.tune.objective import ObjectiveSpec, sample_and_score

log = logging.getLogger(__name__)
PREFIX = "val_"  # the validation task's metrics, as reported to Ray Train and logged to MLflow


def score_attribute(extractor: str) -> str:
    """The metric Ray Train ranks checkpoints by (lower is better): KID on the validation split."""
    return f"{PREFIX}kid_std_{extractor}"


@dataclass(frozen=True)
class CheckpointValidation:
    """What the validation task needs besides the checkpoint: how to score it, the seed, and where to log it."""

    objective: ObjectiveSpec  # the validation split, checkpoint_samples samples
    seed: int
    tracking_uri: str
    run_id: str
    dataset: tuple[str, str]  # the shard set's name and digest, which the linked metrics name

    def __call__(self, checkpoint, **_) -> dict:
        """Ray Train's validation function: {val_kid_std_<extractor>, …_low, …_high, val_fid_<extractor>, …, val_step}; on
        any failure one warning line (also an MLflow tag) and {}, so the checkpoint keeps its unscored (NaN) rank and
        training is not disturbed."""
        step = -1
        try:
            with checkpoint.as_directory() as directory:
                ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
            step = ckpt.step
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = ckpt.build_model().to(device).eval().requires_grad_(False)
            metrics, samples = sample_and_score(self.objective.evaluator(), model, ckpt.schedule, self.objective, self.seed, device=device)
            scored = {f"{PREFIX}{k}": v for k, v in metrics.items() if k.startswith(("kid_std_", "fid_")) or k == "num_samples"}
        except Exception as err:  # noqa: BLE001 — a bad reference, an unreadable checkpoint: said, never fatal to training
            message = f"checkpoint validation of step {step} failed: {type(err).__name__}: {first_line(err, 300)}"
            log.warning(message)
            tracking.log_to_run(self.tracking_uri, self.run_id, tags={f"validation.failed.step_{step}": message})
            return {}
        ema = {k: v.cpu() for k, v in model.state_dict().items()}  # the EMA weights only: what it samples with
        sampler = Checkpoint(ckpt.model_config, ckpt.schedule, ema, step=step, run=ckpt.run)
        model_id = tracking.log_checkpoint_model(self.tracking_uri, self.run_id, sampler, scored, self.dataset)
        with tempfile.TemporaryDirectory() as tmp:  # the run's sample grid at this step, drawn here instead of on rank 0
            tracking.log_image_file(self.tracking_uri, self.run_id, save_image_grid(samples[:100], Path(tmp) / "grid.png", nrow=10),
                                    "samples", step)
        return {**scored, f"{PREFIX}step": step, **({f"{PREFIX}model_id": model_id} if model_id else {})}


def best_checkpoint(checkpoints: list[tuple[object, dict]], attribute: str) -> tuple[object, dict] | None:
    """The (checkpoint, metrics) of lowest finite ``attribute`` among Ray Train's kept checkpoints; None if none was scored."""
    scored = [(c, m) for c, m in checkpoints if isinstance(m.get(attribute), float) and math.isfinite(m[attribute])]
    return min(scored, key=lambda cm: cm[1][attribute]) if scored else None

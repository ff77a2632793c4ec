"""Training checkpoints handled off the training workers, by Ray Train's checkpoint validation (a Ray task per checkpoint,
while training goes on). With ``evaluation.checkpoint_samples`` the task samples that many images with the checkpoint's
EMA network and sampler and scores them against the **validation** split (KID with its 95% interval, FID); the checkpoint
becomes an MLflow LoggedModel of the training run (a pyfunc that samples, at its step) with those metrics linked to it,
Ray Train keeps the best checkpoint by that KID beside the latest, and the first 100 samples are the run's sample grid at
that step. Without it the task only draws the sample grid of a checkpoint step (but the last, which rank 0 draws: no
training is left to stall). Choosing the best is a selection on validation: the test split judges it afterwards (``run``'s evaluation)."""
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
from pipelines.train_worker import CHECKPOINT_FILE, grid_samples
from pipelines.tune.objective import ObjectiveSpec, sample_and_score

log = logging.getLogger(__name__)
PREFIX = "val_"  # the validation task's metrics, as reported to Ray Train and logged to MLflow


def score_attribute(extractor: str) -> str:
    """The metric Ray Train ranks checkpoints by (lower is better): KID on the validation split."""
    return f"{PREFIX}kid_std_{extractor}"


@dataclass(frozen=True)
class CheckpointValidation:
    """What the validation task needs besides the checkpoint: how to score it (None: draw the grid only), the seed, and
    where to log it."""

    objective: ObjectiveSpec | None  # the validation split, checkpoint_samples samples
    seed: int  # of the scored samples; of the grid alone, the training seed (grids of all steps compare)
    tracking_uri: str
    run_id: str
    dataset: tuple[str, str]  # the shard set's name and digest, which the linked metrics name
    patience: float = 60.0  # seconds to keep trying a tracking server that cannot take the grid (tracking.flush_timeout)

    def __call__(self, checkpoint, **_) -> dict:
        """Ray Train's validation function: {val_kid_std_<extractor>, …_low, …_high, val_fid_<extractor>, …, val_step}, or
        {} when it only draws the grid; on any failure one warning line (also an MLflow tag) and {}, so the checkpoint keeps
        its unscored (NaN) rank and training is not disturbed."""
        step, scored = -1, {}
        try:
            with checkpoint.as_directory() as directory:
                ckpt = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
            step = ckpt.step
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = ckpt.build_model().to(device).eval().requires_grad_(False)
            if self.objective is None:
                samples = grid_samples(model, ckpt.schedule, self.seed, device)
            else:
                metrics, samples = sample_and_score(self.objective.evaluator(), model, ckpt.schedule, self.objective, self.seed,
                                                    device=device)
                scored = {f"{PREFIX}{k}": v for k, v in metrics.items() if k.startswith(("kid_std_", "fid_")) or k == "num_samples"}
        except Exception as err:  # noqa: BLE001 — a bad reference, an unreadable checkpoint: said, never fatal to training
            message = f"checkpoint validation of step {step} failed: {type(err).__name__}: {first_line(err, 300)}"
            log.warning(message)
            tracking.log_to_run(self.tracking_uri, self.run_id, tags={f"validation.failed.step_{step}": message})
            return {}
        with tempfile.TemporaryDirectory() as tmp:  # the run's sample grid at this step, drawn here instead of on rank 0
            tracking.log_image_file(self.tracking_uri, self.run_id, save_image_grid(samples[:100], Path(tmp) / "grid.png", nrow=10),
                                    "samples", step, self.patience)
        if self.objective is None:
            return {}
        ema = {k: v.cpu() for k, v in model.state_dict().items()}  # the EMA weights only: what it samples with
        sampler = Checkpoint(ckpt.model_config, ckpt.schedule, ema, step=step, run=ckpt.run)
        model_id = tracking.log_checkpoint_model(self.tracking_uri, self.run_id, sampler, scored, self.dataset)
        return {**scored, f"{PREFIX}step": step, **({f"{PREFIX}model_id": model_id} if model_id else {})}


def best_checkpoint(checkpoints: list[tuple[object, dict]], attribute: str) -> tuple[object, dict] | None:
    """The (checkpoint, metrics) of lowest finite ``attribute`` among Ray Train's kept checkpoints; None if none was scored."""
    scored = [(c, m) for c, m in checkpoints if isinstance(m.get(attribute), float) and math.isfinite(m[attribute])]
    return min(scored, key=lambda cm: cm[1][attribute]) if scored else None

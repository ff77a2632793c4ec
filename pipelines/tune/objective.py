"""The tuning objective: a score model's samples under given sampler settings, scored against the reference split.
One typed spec and one function serve a training trial's periodic evaluations, the sampler-only trials and the
confirmation, so all three measure the same thing."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ncsn.data import to_stored
from ncsn.sampling import sample_images
from ncsn.sigmas import Schedule
from pipelines.config import Config

if TYPE_CHECKING:
    from pipelines.evaluate import Evaluator


@dataclass(frozen=True)
class ObjectiveSpec:
    """How a tuning job scores a model: the reference shards and split, the feature extractor and its settings, the sample
    count and sampler's final denoising step; ``every``: training steps between evaluations in a training trial. The
    search and the selection score against the validation split; the verdict against the test split."""

    shards: str
    reference_split: str  # validation | test
    extractor: str  # "classifier" or "inception"
    cache_dir: str
    num_samples: int
    resamples: int
    denoise: bool
    every: int
    inception_weights: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, shards: str, reference_split: str) -> ObjectiveSpec:
        """The objective of ``cfg.tune`` (its metric names the extractor) against ``reference_split``, cached in
        ``cfg.eval_cache_dir()``."""
        return cls(shards, reference_split, cfg.tune.extractor, str(cfg.eval_cache_dir()), cfg.tune.eval_samples, cfg.evaluation.resamples,
                   cfg.sampling.denoise, cfg.tune.eval_every, cfg.evaluation.inception_weights)

    def evaluator(self) -> Evaluator:
        """This spec's Evaluator, built once per process (a training worker, or the worker process that Ray reuses for a
        job's scoring tasks): the manifest, the reference split, the classifier and the reference features are read once.
        The first one for a shard set trains and caches the classifier in ``cache_dir``."""
        from pipelines.evaluate import Evaluator  # torch-fidelity: imported where a model is scored, not by every training worker

        if self not in _EVALUATORS:
            _EVALUATORS[self] = Evaluator(self.shards, self.extractor, self.inception_weights, self.reference_split,
                                          cache_dir=Path(self.cache_dir), resamples=self.resamples)
        return _EVALUATORS[self]


_EVALUATORS: dict[ObjectiveSpec, Evaluator] = {}


def sample_and_score(evaluator: Evaluator, model: torch.nn.Module, schedule: Schedule, spec: ObjectiveSpec, seed: int,
                     num_samples: int | None = None, device: torch.device | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """KID/FID/IS (flat, as logged) of ``num_samples`` (default ``spec.num_samples``) annealed-Langevin samples drawn with
    ``schedule`` (σ levels, ε, T; the objective's final denoising step) and ``seed``, and the samples in [0, 1]."""
    device = device or next(model.parameters()).device
    c, s = model.config.channels, model.config.image_size
    schedule = replace(schedule, denoise=spec.denoise)
    samples = sample_images(model, (num_samples or spec.num_samples, c, s, s), schedule,
                            generator=torch.Generator(device=device).manual_seed(seed), device=device,
                            levels_only=model.levels_only).samples
    return evaluator.metrics(to_stored(samples), seed=seed), samples

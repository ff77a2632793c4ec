"""The MLflow model of a training run, logged as code (MLflow's "models from code"), so loading it unpickles nothing: a
pyfunc that reads the run's checkpoint with ``weights_only=True`` and samples with annealed Langevin dynamics.

Input: a table with ``num_samples`` and, optionally, ``seed`` (one row per request); output: uint8 images
(N, H, W, C) with the rows' samples in order. Needs only torch, numpy, mlflow and the ``ncsn`` package logged beside it."""
from __future__ import annotations

import mlflow.models
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from ncsn.checkpoint import load_checkpoint
from ncsn.data import to_stored
from ncsn.sampling import sample_images


class NCSNSampler(PythonModel):
    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = load_checkpoint(context.artifacts["checkpoint"], map_location=self.device)
        self.model = ckpt.build_model().to(self.device).eval().requires_grad_(False)
        self.schedule = ckpt.schedule

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        cfg, batches = self.model.config, []
        for row in model_input.to_dict("records"):
            n, seed = int(row["num_samples"]), int(row.get("seed") or 0)
            if n < 1:
                raise ValueError(f"num_samples must be >= 1, got {n}")
            gen = torch.Generator(device=self.device).manual_seed(seed)
            images = sample_images(self.model, (n, cfg.channels, cfg.image_size, cfg.image_size), self.schedule, generator=gen,
                                   device=self.device, levels_only=self.model.levels_only).samples
            batches.append(to_stored(images))
        return np.concatenate(batches)


mlflow.models.set_model(NCSNSampler())

"""The MLflow model of a training run, logged as code (MLflow's "models from code"), so loading it unpickles nothing: a
pyfunc that reads the run's checkpoint with ``weights_only=True`` and samples with annealed Langevin dynamics.

Input: a table with ``num_samples`` and, optionally, ``seed`` (one row per request); output: uint8 images
(N, H, W, C) with the rows' samples in order, under a progress bar of network evaluations on a terminal. Needs only
torch, numpy, mlflow, tqdm and the ``ncsn`` package logged beside it."""
from __future__ import annotations

import mlflow.models
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from tqdm import tqdm

from ncsn.checkpoint import load_checkpoint
from ncsn.data import to_stored
from ncsn.sampling import nfe, sample_images


class NCSNSampler(PythonModel):
    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = load_checkpoint(context.artifacts["checkpoint"], map_location=self.device)
        self.model = ckpt.build_model().to(self.device).eval().requires_grad_(False)
        self.schedule = ckpt.schedule

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        cfg, batches = self.model.config, []
        requests = [(int(row["num_samples"]), int(row.get("seed") or 0)) for row in model_input.to_dict("records")]
        for n, _ in requests:
            if n < 1:
                raise ValueError(f"num_samples must be >= 1, got {n}")
        evaluations = nfe(self.schedule, self.model.levels_only)
        with tqdm(total=len(requests) * evaluations, desc=f"sampling {sum(n for n, _ in requests)} images",
                  unit="NFE", disable=None) as bar:  # on a terminal only: served models log no bars
            def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                bar.update(1)
                return self.model(x, sigma)

            for n, seed in requests:
                gen = torch.Generator(device=self.device).manual_seed(seed)
                images = sample_images(counted, (n, cfg.channels, cfg.image_size, cfg.image_size), self.schedule,
                                       generator=gen, device=self.device, levels_only=self.model.levels_only).samples
                batches.append(to_stored(images))
        return np.concatenate(batches)


mlflow.models.set_model(NCSNSampler())

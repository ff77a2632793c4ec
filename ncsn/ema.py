"""Exponential moving average of model weights (NCSNv2 technique 5), used for sampling."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← m θ_ema + (1 − m) θ after each step; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.model = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self._averaged = {name for name, p in self.model.named_parameters() if p.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = _unwrap(model).state_dict()
        for name, value in self.model.state_dict().items():
            if name in self._averaged:
                value.lerp_(current[name].detach(), 1.0 - self.decay)
            else:
                value.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)

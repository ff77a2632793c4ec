"""Single-process NCSN training steps, the loop each Ray Train worker runs."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ncsn.data import to_unit_interval
from ncsn.ema import EMA
from ncsn.losses import LEVEL_LOSSES

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN/inf loss; raised before the optimiser step so no poisoned weights are kept."""


@dataclass
class StepStats:
    """What one optimiser step did."""

    step: int
    loss: float
    per_level_sum: torch.Tensor
    per_level_count: torch.Tensor
    grad_norm: float
    images: int


def _summed_over_ranks(loss: torch.Tensor, per_level_sum: torch.Tensor) -> torch.Tensor:
    """[loss, per-level loss sums] summed over the torch.distributed ranks (as they are without it): a NaN/inf on any
    rank stays, so all ranks stop at the same step with the same message (a rank that stopped alone would leave the
    others waiting in the gradient all-reduce)."""
    summed = torch.cat([loss.detach().float().reshape(1), per_level_sum.detach().float()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(summed)
    return summed


def train_steps(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    sigmas: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    num_steps: int,
    start_step: int = 0,
    ema: EMA | None = None,
    grad_clip: float | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    objective: str = "dsm",
    continuous_sigma: bool = False,
) -> Iterator[StepStats]:
    """Run DSM steps start_step+1 … num_steps over ``batches`` (cycled), yielding StepStats after each.

    ``model`` is a score network taking (x, σ) (it may be DDP-wrapped); ``transform`` maps a batch as
    loaded to the model's input (e.g. dequantisation). ``amp`` uses autocast (and ``scaler``) on CUDA.
    ``objective``: "dsm" (denoising score matching) or "ssm" (sliced score matching), both per noise level;
    ``continuous_sigma``: σ log-uniform between σ_L and σ_1 instead of one of the levels (for a model that takes any σ).
    """
    if objective not in LEVEL_LOSSES:
        raise ValueError(f"objective must be one of {', '.join(LEVEL_LOSSES)}, got {objective!r}")
    loss_fn = LEVEL_LOSSES[objective]
    device = next(model.parameters()).device
    sigmas = sigmas.to(device)
    step = start_step
    model.train()
    while step < num_steps:
        empty = True
        for batch in batches:
            empty = False
            if step >= num_steps:
                return
            step += 1
            x = batch.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            if not x.is_floating_point():
                raise ValueError(f"batch of dtype {x.dtype} reached the model: pass a transform such as to_unit_interval")
            with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
                out = loss_fn(model, x, sigmas, continuous=continuous_sigma)
            loss = out.loss.float()
            summed = _summed_over_ranks(loss, out.per_level_sum)
            if not torch.isfinite(summed).all():
                bad = [f"{i} (σ={sigmas[i].item():.4g})" for i in range(sigmas.numel()) if not torch.isfinite(summed[1 + i])]
                raise NonFiniteLossError(f"loss is {summed[0].item()} at step {step}; non-finite at levels {', '.join(bad)}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else math.inf)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(model)
            yield StepStats(step, loss.item(), out.per_level_sum.cpu(), out.per_level_count.cpu(), grad_norm.item(), x.shape[0])
        if empty:
            raise ValueError("batches is empty: the data loader yielded no batch")


def infinite_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled mini-batches of an in-memory tensor, epoch after epoch (the last partial batch dropped)."""
    if images.shape[0] < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {images.shape[0]} images given")
    while True:
        order = torch.randperm(images.shape[0], generator=generator)
        for i in range(0, images.shape[0] - batch_size + 1, batch_size):
            yield images[order[i : i + batch_size]]


def fit(
    images: torch.Tensor,
    model: nn.Module,
    sigmas: torch.Tensor,
    *,
    num_steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    grad_clip: float | None = None,
    seed: int = 0,
    log_every: int = 0,
    objective: str = "dsm",
) -> EMA:
    """Train ``model`` on in-memory uint8 images (N, C, H, W) with Adam and dequantisation; return its EMA.

    The notebook-sized trainer: the Ray pipeline runs train_steps itself over sharded data.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ema = EMA(model, ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = infinite_batches(images, batch_size, gen)
    for stats in train_steps(model, batches, sigmas, optimizer, num_steps=num_steps, ema=ema, grad_clip=grad_clip,
                             transform=lambda b: to_unit_interval(b, dequantize=True, generator=gen), objective=objective):
        if log_every and stats.step % log_every == 0:
            log.info("step %d/%d  loss %.4f  grad-norm %.3g", stats.step, num_steps, stats.loss, stats.grad_norm)
    return ema

"""Argument checks shared by the library (every failure a ValueError naming the argument), and the one-line form of an
error that every one-line message quotes."""
from __future__ import annotations

import math

import torch


def is_positive_number(value: object) -> bool:
    """A finite int or float > 0 (not a bool): the one rule every "finite number > 0" check of the project applies."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def positive(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number > 0, else raise ValueError naming ``name``."""
    if not is_positive_number(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def non_negative_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 0, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def non_negative(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number >= 0, else raise ValueError naming ``name``."""
    if value != 0 and not is_positive_number(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def noise_schedule(sigmas, name: str = "sigmas"):
    """Return ``sigmas`` if it is a non-empty 1-D float tensor of finite σ > 0, strictly decreasing (σ_1 > … > σ_L);
    else raise ValueError naming ``name``."""

    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1 or not sigmas.is_floating_point():
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"{name} must be a non-empty 1-D float tensor, got {shape}")
    if not torch.isfinite(sigmas).all() or (sigmas <= 0).any():
        raise ValueError(f"{name} must all be finite and > 0, got {sigmas.tolist()[:6]}")
    if sigmas.numel() > 1 and (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"{name} must be strictly decreasing (σ_1 > … > σ_L), got {sigmas.tolist()[:6]}")
    return sigmas


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err``'s message, at most ``limit`` characters; its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__

"""Argument checks shared by the library: every failure is a ValueError naming the argument."""
from __future__ import annotations

import math


def positive(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number > 0, else raise ValueError naming ``name``."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value

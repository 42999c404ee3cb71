"""Argument checks shared by the GP priors over latent paths."""

from __future__ import annotations

import math


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (a bool is refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float(value: object, name: str) -> float:
    """``value`` as a positive finite float: TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)

"""Argument orders of the sequence models' conveniences before :class:`pvae.protocol.SequenceVAE`.

The protocol's order is the pair's own, ``(values, times, mask)`` (so ``model.impute(*split)``
works for a :class:`pvae.data.SequenceSplit`), and ``sample(num_steps, num_samples, times)``.
Earlier releases took ``impute(values, mask, times)`` / ``forecast(values, steps, mask,
times)`` (StructuredVAE, KoopmanVAE) and ``sample(times, num_samples)`` (MarkovianGPVAE,
GPVAE). Those calls are told apart without ambiguity (a mask is a bool tensor, time stamps
are floating point; a step count is an int) and still work, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["legacy_frame_order", "legacy_sample_order"]


def _is_mask(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.bool


def legacy_frame_order(times: Any, mask: Any, method: str) -> tuple[Any, Any]:
    """``(times, mask)``, swapped when a bool tensor (a mask) came in the ``times`` slot and
    the ``mask`` slot holds no mask (the old ``(values, mask, times)`` order)."""
    if _is_mask(times) and not _is_mask(mask):
        warnings.warn(
            f"{method}(values, mask, times) is the old argument order: call "
            f"{method}(values, times, mask) or pass mask= by keyword",
            DeprecationWarning,
            stacklevel=4,
        )
        return mask, times
    return times, mask


def legacy_sample_order(num_steps: Any, times: Any) -> tuple[Any, Any]:
    """``(num_steps, times)``; a time-stamp tensor in the ``num_steps`` slot (the old
    ``sample(times, num_samples)``) gives ``(len(times), times)``."""
    if isinstance(num_steps, Tensor) and times is None:
        warnings.warn(
            "sample(times, num_samples) is the old argument order: call "
            "sample(num_steps, num_samples, times=times)",
            DeprecationWarning,
            stacklevel=4,
        )
        if num_steps.dim() != 1:
            raise ValueError(f"times must be a tensor of shape (T,), got {tuple(num_steps.shape)}")
        return num_steps.shape[0], num_steps
    return num_steps, times

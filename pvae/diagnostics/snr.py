"""Gradient signal-to-noise ratio (Rainforth et al. 2018, "Tighter Variational Bounds are Not
Necessarily Better"): per parameter element, SNR = ``|E[g]| / std[g]`` over repeated gradient
estimates on the same data, summarised separately for the guide's and the model's parameters
(the split is read from the traces)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pvae.evaluate import Data, as_tensors
from pvae.protocol import param_split


@dataclass
class GradientSNR:
    """``per_param``: name -> SNR tensor shaped like the parameter; ``guide`` / ``model``:
    the mean SNR over the elements of the guide's / the model's parameters (NaN when a side
    has none)."""

    per_param: dict[str, torch.Tensor]
    guide: float
    model: float
    guide_params: list[str]
    model_params: list[str]


def gradient_snr(
    model: Callable,
    guide: Callable,
    data: Data,
    engine: Any,
    num_repeats: int = 100,
) -> GradientSNR:
    """Estimate the gradient SNR of ``engine`` on ``data`` (one batch: all of it).

    Each repeat calls ``engine.loss_and_grads`` once on the same data with fresh samples.
    Parameters are not changed; their ``.grad`` is cleared afterwards.
    """
    if num_repeats < 2:
        raise ValueError(
            f"num_repeats must be >= 2 to estimate a standard deviation, got {num_repeats}"
        )
    args = as_tensors(data)
    model_params, guide_params = param_split(model, guide, args)
    params = {**model_params, **guide_params}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for p in params.values():
        p.grad = None
    for _ in range(num_repeats):
        engine.loss_and_grads(model, guide, *args)
        for name, p in params.items():
            samples[name].append(
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            )
            p.grad = None
    per_param = {}
    for name, grads in samples.items():
        g = torch.stack(grads)
        per_param[name] = g.mean(0).abs() / g.std(0).clamp_min(1e-30)

    def summary(names):
        if not names:
            return float("nan")
        return float(torch.cat([per_param[n].reshape(-1) for n in names]).mean())

    return GradientSNR(
        per_param,
        summary(list(guide_params)),
        summary(list(model_params)),
        list(guide_params),
        list(model_params),
    )

"""Products of diagonal Gaussian experts.

The normalised product of Gaussian densities N(z; mu_m, sigma_m^2) (each raised to a weight
w_m >= 0, e.g. 0/1 for an expert that is present or absent) and, optionally, a prior expert
N(z; mu_0, sigma_0^2) with weight w_0, is Gaussian; precisions add:

    1 / sigma^2 = w_0 / sigma_0^2 + sum_m w_m / sigma_m^2
    mu          = sigma^2 (w_0 mu_0 / sigma_0^2 + sum_m w_m mu_m / sigma_m^2)

Used by the ladder VAE's top-down merge (Sønderby et al. 2016: the bottom-up evidence and the
top-down prior of a layer) and the multimodal VAEs' product of experts (Wu & Goodman 2018: the
modalities' encoders and the prior). Every dimension is treated independently.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["product_of_experts"]


def product_of_experts(
    loc: Tensor,
    scale: Tensor,
    weights: Tensor | None = None,
    prior: tuple[Tensor | float, Tensor | float] | None = None,
    prior_weight: Tensor | float = 1.0,
    dim: int = -2,
) -> tuple[Tensor, Tensor]:
    """The product of the experts stacked along ``dim``, times the optional prior expert.

    :param loc, scale: the experts' means and standard deviations, ``(..., M, D)`` with the M
        experts along ``dim`` (shapes broadcast).
    :param weights: each expert's weight, broadcastable to ``loc`` (e.g. ``(..., M, 1)`` with
        0 for an absent expert); None: every expert counts once.
    :param prior: ``(mu_0, sigma_0)`` of the prior expert, broadcastable to the result; None:
        no prior expert.
    :param prior_weight: the prior expert's weight (a number or a tensor broadcastable to the
        result, e.g. 1 only where no expert is present).
    :returns: ``(loc, scale)`` of the product, ``(..., D)``. A product with zero total
        precision (no expert, no prior) has infinite scale and a NaN mean.
    """
    precision = scale.pow(-2)
    if weights is not None:
        precision = precision * weights.to(precision.dtype)
    total = precision.sum(dim)
    weighted = (precision * loc).sum(dim)
    if prior is not None:
        prior_loc, prior_scale = prior
        prior_precision = prior_weight * torch.as_tensor(prior_scale, dtype=total.dtype).pow(-2)
        total = total + prior_precision
        weighted = weighted + prior_precision * prior_loc
    return weighted / total, total.rsqrt()

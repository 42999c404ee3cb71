"""Seeded synthetic sets whose truth is exact: ``linear-gaussian`` (``z ~ N(0, I)``,
``x = W z + b + noise * eps``) with its exact :func:`linear_gaussian_log_likelihood` and
:func:`linear_gaussian_posterior`, and :func:`_synthetic_splits`, which cuts any generated
``x (n, x_dim)`` into train/valid/test."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pvae.data.containers import Splits, _permutation_split
from pvae.data.registry import register


def _synthetic_splits(
    name: str,
    x: Tensor,
    seed: int,
    likelihood: str,
    info: dict[str, Any],
    labels: Tensor | None = None,
    fractions: tuple[float, float] = (0.1, 0.1),
) -> Splits:
    """Split generated data ``x (n, x_dim)`` 80/10/10 (by default) with a seeded permutation.

    ``info`` carries the generating truth.
    """
    n = x.shape[0]
    n_valid, n_test = (round(f * n) for f in fractions)
    generator = torch.Generator().manual_seed(seed)
    train, valid, test = _permutation_split(n, (n - n_valid - n_test, n_valid, n_test), generator)
    return Splits(
        name=name,
        train=x[train],
        valid=x[valid],
        test=x[test],
        x_dim=int(x.shape[1]),
        image_shape=None,
        likelihood=likelihood,
        train_labels=None if labels is None else labels[train],
        valid_labels=None if labels is None else labels[valid],
        test_labels=None if labels is None else labels[test],
        info={**info, "seed": seed},
    )


def _check_positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"dataset {name!r}: {key} must be positive, got {value!r}")


@register(
    "linear-gaussian",
    "z ~ N(0, I), x = W z + b + noise * eps: exact log p(x) and posterior known",
    "seeded generator (pvae.data)",
)
def _linear_gaussian(
    n: int = 2000, x_dim: int = 10, z_dim: int = 2, noise: float = 0.5, seed: int = 0
) -> Splits:
    _check_positive("linear-gaussian", n=n, x_dim=x_dim, z_dim=z_dim, noise=noise)
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, z_dim, generator=generator)
    b = torch.randn(x_dim, generator=generator)
    z = torch.randn(n, z_dim, generator=generator)
    x = z @ W.T + b + noise * torch.randn(n, x_dim, generator=generator)
    info = {"W": W, "b": b, "noise": float(noise), "z_dim": z_dim}
    return _synthetic_splits("linear-gaussian", x, seed, "gaussian", info)


def linear_gaussian_log_likelihood(
    x: Tensor, W: Tensor, b: Tensor, noise: float | Tensor
) -> Tensor:
    """Exact ``log p(x) = log N(x; b, W W^T + noise^2 I)`` of the linear-Gaussian model.

    :param x: ``(N, x_dim)`` (any batch shape ``(..., x_dim)``).
    :param W: ``(x_dim, z_dim)``.
    :param b: ``(x_dim,)``.
    :param noise: observation standard deviation ``s > 0``.
    :returns: ``(N,)`` log-densities in nats, in ``x``'s dtype (computed in float64).
    """
    W64, b64, x64 = W.double(), b.double(), x.double()
    variance = torch.as_tensor(noise, dtype=torch.float64) ** 2
    covariance = W64 @ W64.T + variance * torch.eye(W64.shape[0], dtype=torch.float64)
    distribution = torch.distributions.MultivariateNormal(b64, covariance_matrix=covariance)
    return distribution.log_prob(x64).to(x.dtype)


def linear_gaussian_posterior(
    x: Tensor, W: Tensor, b: Tensor, noise: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Exact posterior ``p(z | x) = N(mean, cov)`` of the linear-Gaussian model.

    ``cov = (I + W^T W / s^2)^{-1}``, ``mean = cov W^T (x - b) / s^2``.

    :param x: ``(N, x_dim)``.
    :param W: ``(x_dim, z_dim)``.
    :param b: ``(x_dim,)``.
    :param noise: observation standard deviation ``s > 0``.
    :returns: ``mean`` of shape ``(N, z_dim)`` and ``cov`` of shape ``(z_dim, z_dim)`` (shared by
        every datapoint), in ``x``'s dtype (computed in float64).
    """
    W64, b64, x64 = W.double(), b.double(), x.double()
    variance = torch.as_tensor(noise, dtype=torch.float64) ** 2
    precision = torch.eye(W64.shape[1], dtype=torch.float64) + W64.T @ W64 / variance
    cov = torch.linalg.inv(precision)
    cov = 0.5 * (cov + cov.T)
    mean = (x64 - b64) @ W64 @ cov / variance
    return mean.to(x.dtype), cov.to(x.dtype)

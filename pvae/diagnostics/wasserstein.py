"""Sliced and distributional sliced Wasserstein distances between two samples.

For samples ``x`` ``(n, d)`` and ``y`` ``(m, d)`` with empirical measures mu and nu, and a unit
direction theta, the projections ``theta^T x`` are one-dimensional, where the Wasserstein
distance is a comparison of quantile functions::

    W_p^p(theta # mu, theta # nu) = int_0^1 |F^{-1}_{theta#mu}(t) - F^{-1}_{theta#nu}(t)|^p dt

(for n == m: the mean of ``|sort(theta^T x)_i - sort(theta^T y)_i|^p``; otherwise both quantile
functions are read at the midpoints of ``max(n, m)`` equal bins, by linear interpolation).

**Sliced Wasserstein** (Bonneel et al. 2015) averages over directions drawn uniformly from the
unit sphere S^{d-1}::

    SW_p(mu, nu) = ( E_{theta ~ U(S^{d-1})} W_p^p(theta # mu, theta # nu) )^{1/p},

estimated with ``num_projections`` random directions. For mu = N(m1, I), nu = N(m2, I) the
projections are N(theta^T m1, 1) and N(theta^T m2, 1), whose W_2^2 is (theta^T (m1 - m2))^2,
and ``E[(theta^T u)^2] = |u|^2 / d`` for uniform theta: ``SW_2^2 = |m1 - m2|^2 / d``.

**Distributional sliced Wasserstein** (Nguyen, Ho, Pham and Bui 2021) replaces the uniform
distribution by the most discriminative distribution sigma over directions that still spreads
them out::

    DSW_p(mu, nu; C) = sup_{sigma in M_C} ( E_{theta ~ sigma} W_p^p(theta # mu, theta # nu) )^{1/p},
    M_C = { sigma : E_{theta, theta' ~ sigma} |theta^T theta'| <= C }.

As in their paper, sigma is the push-forward of a standard Gaussian by ``f(e) / |f(e)|`` with
f a learned map (here linear, ``f(e) = A e``, A initialised to the identity so that sigma
starts uniform), and the constraint enters as a Lagrangian penalty: a few steps of gradient
ascent on::

    ( (1/L) sum_l W_p^p(theta_l # mu, theta_l # nu) )^{1/p}
        - lambda_C * mean_{l != l'} |theta_l^T theta_l'|

over A (``regularization`` = lambda_C). The value returned is the first term at the ascent's
best iterate, on directions drawn afresh from the final map when ``fresh=True``. Since sigma
starts at the uniform distribution and the iterate with the largest objective is kept, DSWD is
at least SW up to Monte-Carlo error; for two Gaussians it approaches the largest projected
distance, ``|m1 - m2|`` for unit covariances, as the directions concentrate.

Tran, Nguyen, Rossi, Bonilla, Filippone and Michiardi (2021, "Model selection for Bayesian
autoencoders") choose the prior of a Bayesian autoencoder by minimising DSWD between its
prior-predictive outputs and the data (:meth:`pvae.models.BayesianAE.select_prior`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "distributional_sliced_wasserstein",
    "projected_wasserstein",
    "random_directions",
    "sliced_wasserstein",
]


def _check_samples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor (num_points, dim), got {type(value)}")
        if value.dim() != 2 or value.shape[0] < 1:
            raise ValueError(
                f"{name} must have shape (num_points, dim) with num_points >= 1, got "
                f"{tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same dimension, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return x.to(dtype), y.to(dtype)


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p < 1:
        raise ValueError(f"p must be a number >= 1, got {p!r}")
    return float(p)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def random_directions(
    num_projections: int, dim: int, generator: torch.Generator | None = None, dtype=None
) -> Tensor:
    """``num_projections`` directions drawn uniformly from the unit sphere, ``(L, dim)``."""
    num_projections = _check_count(num_projections, "num_projections")
    dim = _check_count(dim, "dim")
    directions = torch.randn(num_projections, dim, generator=generator, dtype=dtype)
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _quantiles(sorted_values: Tensor, count: int) -> Tensor:
    """The empirical quantile function of each column of ``sorted_values`` ``(n, L)`` at the
    ``count`` bin midpoints ``(i + 1/2) / count`` (linear interpolation), ``(count, L)``."""
    n = sorted_values.shape[0]
    if n == count:
        return sorted_values
    position = (torch.arange(count, dtype=sorted_values.dtype) + 0.5) * (n / count) - 0.5
    position = position.clamp(0, n - 1)
    low = position.floor().long()
    high = (low + 1).clamp_max(n - 1)
    weight = (position - low.to(position.dtype)).unsqueeze(1)
    return sorted_values[low] * (1 - weight) + sorted_values[high] * weight


def projected_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: float = 2.0) -> Tensor:
    """``W_p^p`` between the projections of ``x`` ``(n, d)`` and ``y`` ``(m, d)`` on each of
    ``directions`` ``(L, d)`` (unit rows), shape ``(L,)``; differentiable in all three."""
    n, m = x.shape[0], y.shape[0]
    count = max(n, m)
    x_sorted = _quantiles(torch.sort(x @ directions.T, dim=0).values, count)
    y_sorted = _quantiles(torch.sort(y @ directions.T, dim=0).values, count)
    return (x_sorted - y_sorted).abs().pow(p).mean(0)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 100,
    p: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sliced Wasserstein distance SW_p between the samples ``x`` ``(n, d)`` and ``y``
    ``(m, d)``, estimated with ``num_projections`` uniform random directions (a scalar tensor;
    differentiable in ``x`` and ``y``).

    :param p: the order, >= 1.
    :param generator: draws the directions (seed it for a reproducible estimate).
    """
    x, y = _check_samples(x, y)
    p = _check_p(p)
    directions = random_directions(num_projections, x.shape[1], generator, x.dtype)
    return projected_wasserstein(x, y, directions, p).mean().pow(1 / p)


def _mean_abs_cosine(directions: Tensor) -> Tensor:
    """``mean_{l != l'} |theta_l^T theta_l'|`` of unit rows ``(L, d)`` (0 for L == 1)."""
    count = directions.shape[0]
    if count < 2:
        return directions.new_zeros(())
    gram = (directions @ directions.T).abs()
    return (gram.sum() - gram.diagonal().sum()) / (count * (count - 1))


def distributional_sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 100,
    p: float = 2.0,
    regularization: float = 1.0,
    num_steps: int = 20,
    lr: float = 0.1,
    fresh: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The distributional sliced Wasserstein distance DSW_p between the samples ``x``
    ``(n, d)`` and ``y`` ``(m, d)`` (Nguyen et al. 2021; see the module docstring), a scalar
    tensor (detached from ``x`` and ``y``: the directions are optimised, not the samples).

    :param num_projections: directions drawn from sigma per step (and for the final value).
    :param p: the order, >= 1.
    :param regularization: lambda_C, the weight of ``E|theta^T theta'|``; larger values keep
        the directions spread (towards SW), smaller ones let them concentrate (towards max-SW).
    :param num_steps: gradient-ascent steps (Adam with learning rate ``lr``) on the map.
    :param fresh: evaluate the best map on newly drawn directions (an unbiased estimate of its
        value); False: report the best objective's distance term as seen during the ascent.
    :param generator: draws the directions (seed it for a reproducible estimate).
    """
    x, y = _check_samples(x, y)
    p = _check_p(p)
    num_projections = _check_count(num_projections, "num_projections")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    for name, value in (("regularization", regularization), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    x, y = x.detach(), y.detach()
    dim = x.shape[1]
    matrix = torch.eye(dim, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([matrix], lr=lr)

    def directions_of(weights: Tensor) -> Tensor:
        noise = torch.randn(num_projections, dim, generator=generator, dtype=x.dtype)
        mapped = noise @ weights.T
        return mapped / mapped.norm(dim=1, keepdim=True).clamp_min(1e-12)

    best_value, best_distance = -math.inf, torch.zeros((), dtype=x.dtype)
    best_matrix = matrix.detach().clone()
    with torch.enable_grad():
        for step in range(num_steps + 1):
            directions = directions_of(matrix)
            distance = projected_wasserstein(x, y, directions, p).mean().clamp_min(1e-30).pow(1 / p)
            objective = distance - regularization * _mean_abs_cosine(directions)
            if float(objective.detach()) > best_value:
                best_value, best_distance = float(objective.detach()), distance.detach()
                best_matrix = matrix.detach().clone()
            if step == num_steps:
                break
            optimizer.zero_grad()
            (-objective).backward()
            optimizer.step()
    if not fresh:
        return best_distance
    with torch.no_grad():
        directions = directions_of(best_matrix)
        return projected_wasserstein(x, y, directions, p).mean().pow(1 / p)

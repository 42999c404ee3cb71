"""Matérn Gaussian processes as linear SDEs: state-space conversions on irregular time grids.

A Matérn GP with smoothness ``nu = p + 1/2`` (p = 0, 1, 2), lengthscale ``l`` and variance
``s^2`` is the first coordinate of a ``d = p + 1``-dimensional linear SDE (Hartikainen &
Särkkä 2010)::

    ds(t) = F s(t) dt + L dW(t),   f(t) = H s(t),   H = [1, 0, ..., 0],   lambda = sqrt(2 nu) / l

    nu = 1/2:  F = [-lambda],                                 P_inf = [s^2]
    nu = 3/2:  F = [[0, 1], [-lambda^2, -2 lambda]],          P_inf = diag(s^2, lambda^2 s^2)
    nu = 5/2:  F = [[0, 1, 0], [0, 0, 1], [-lambda^3, -3 lambda^2, -3 lambda]],
               P_inf = [[s^2, 0, -kappa], [0, kappa, 0], [-kappa, 0, lambda^4 s^2]],
               kappa = lambda^2 s^2 / 3

``s = (f, f', f'', ...)`` holds the value and its derivatives; ``P_inf`` is the stationary
covariance (the solution of ``F P + P F^T + L q L^T = 0``), so the process started at
``N(0, P_inf)`` has covariance ``k(t, t') = H expm(F |t - t'|) P_inf H^T``, the Matérn kernel
``s^2 k_nu(|t - t'| / l)``. Discretised exactly between time stamps ``t_{k-1} < t_k``
(``dt_k = t_k - t_{k-1}``, any spacing)::

    s_k = A_k s_{k-1} + q_k,  A_k = expm(F dt_k),  q_k ~ N(0, Q_k),  Q_k = P_inf - A_k P_inf A_k^T

which is the model of :mod:`pvae.ssm` (``x_1 ~ N(0, P_inf)`` at the first stamp, column
vectors). Smoothing it with :func:`pvae.ssm.kalman_smoother` costs O(T d^3) instead of the
O(T^3) of a dense GP on the same stamps.

Shapes: ``lengthscale`` and ``variance`` are positive tensors ``(...)`` (one GP per batch
entry, e.g. one per latent channel); ``times`` ``(..., T)`` strictly increasing. Everything is
differentiable in the hyper-parameters and the time stamps. A length scale or variance that is
not finite and positive, a noise variance that is negative or not finite, and unsorted or
repeated stamps are refused with a ``ValueError`` naming the argument (any positive length
scale is a valid GP: one much shorter than the gaps gives ``A_k -> 0``, ``Q_k -> P_inf``,
nearly independent values, which the exact discretisation handles).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pvae import ssm, validation

__all__ = [
    "NUS",
    "check_times",
    "lti_discretisation",
    "matern_discretisation",
    "matern_log_marginal",
    "matern_regression",
    "matern_sde",
    "state_dim",
]

NUS = (0.5, 1.5, 2.5)


def state_dim(nu: float) -> int:
    """``d = nu + 1/2``, the state size of the Matérn-``nu`` SDE."""
    if nu not in NUS:
        raise ValueError(f"nu must be one of {NUS}, got {nu!r}")
    return int(nu + 0.5)


def _positive(name: str, value: Tensor, allow_zero: bool = False) -> Tensor:
    """``value`` after checking it is a floating tensor whose entries are finite and positive
    (or >= 0 with ``allow_zero``): refused here, before a Cholesky factor or ``sqrt`` of a
    negative number fails somewhere inside (one vectorised check per call)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    detached = value.detach()
    bad = ~torch.isfinite(detached) | ((detached < 0) if allow_zero else (detached <= 0))
    if bool(bad.any()):
        first = float(detached.flatten()[bad.flatten().nonzero()[0]])
        expected = "finite and >= 0" if allow_zero else "finite and positive"
        raise ValueError(f"{name} must be {expected}, got {first}")
    return value


def matern_sde(nu: float, lengthscale: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """The drift F and the stationary covariance P_inf of the Matérn-``nu`` SDE.

    :param nu: 0.5, 1.5 or 2.5.
    :param lengthscale: ``l``, positive, ``(...)``.
    :param variance: ``s^2``, positive, ``(...)`` (broadcasts with ``lengthscale``).
    :returns: ``F (..., d, d)`` and ``P_inf (..., d, d)``.
    """
    d = state_dim(nu)
    lengthscale = _positive("lengthscale", lengthscale)
    variance = _positive("variance", variance)
    lengthscale, variance = torch.broadcast_tensors(lengthscale, variance)
    lam = math.sqrt(2 * nu) / lengthscale
    zero, one = torch.zeros_like(lam), torch.ones_like(lam)
    if d == 1:
        F = (-lam)[..., None, None]
        P = variance[..., None, None]
        return F, P
    if d == 2:
        rows = [[zero, one], [-(lam**2), -2 * lam]]
        P_rows = [[variance, zero], [zero, lam**2 * variance]]
    else:
        kappa = lam**2 * variance / 3
        rows = [[zero, one, zero], [zero, zero, one], [-(lam**3), -3 * lam**2, -3 * lam]]
        P_rows = [[variance, zero, -kappa], [zero, kappa, zero], [-kappa, zero, lam**4 * variance]]
    F = torch.stack([torch.stack(row, -1) for row in rows], -2)
    P = torch.stack([torch.stack(row, -1) for row in P_rows], -2)
    return F, P


def check_times(times: Tensor, name: str = "times") -> Tensor:
    """The gaps ``(..., T-1)`` of ``times (..., T)``, after checking it is a finite
    floating-point tensor that increases strictly along its last axis
    (:func:`pvae.validation.check_times`)."""
    return validation.check_times(times, name)


def matern_discretisation(
    nu: float, lengthscale: Tensor, variance: Tensor, gaps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact discretisation of the Matérn-``nu`` SDE over the gaps between time stamps.

    :param gaps: ``dt (..., T-1)``, positive; its batch dimensions broadcast with those of
        ``lengthscale`` and ``variance``.
    :returns: ``A (..., T-1, d, d) = expm(F dt)``, ``Q (..., T-1, d, d) = P_inf - A P_inf
        A^T`` and ``P_inf (..., d, d)``.

    A jitter of ``10 eps diag(P_inf)`` (``eps`` the dtype's machine epsilon) is added to Q so
    that its Cholesky factor exists for tiny gaps; it is below 1e-14 relative in float64.
    """
    F, P = matern_sde(nu, lengthscale, variance)
    A = torch.linalg.matrix_exp(F.unsqueeze(-3) * gaps[..., None, None])
    Pk = P.unsqueeze(-3)
    Q = Pk - A @ Pk @ A.mT
    Q = 0.5 * (Q + Q.mT)
    jitter = 10 * torch.finfo(Q.dtype).eps * P.diagonal(dim1=-2, dim2=-1)
    Q = Q + torch.diag_embed(jitter).unsqueeze(-3)
    return A, Q, P


def lti_discretisation(drift: Tensor, diffusion: Tensor, gaps: Tensor) -> tuple[Tensor, Tensor]:
    """Exact discretisation of the linear SDE ``dx = F x dt + dW``, ``Cov(dW) = Sigma dt``,
    over the gaps between time stamps (any F, stable or not)::

        A_k = expm(F dt_k),   Q_k = int_0^{dt_k} expm(F s) Sigma expm(F s)^T ds

    :param drift: F, ``(..., D, D)``.
    :param diffusion: Sigma, ``(..., D, D)``, symmetric positive semi-definite.
    :param gaps: ``dt (..., K)``, positive; its batch dimensions broadcast with those of F and
        Sigma.
    :returns: ``A (..., K, D, D)`` and ``Q (..., K, D, D)`` (symmetric).

    Method: Van Loan's block exponential on a short step ``h = dt / 2^s``, chosen so that
    ``||F||_1 max(dt) / 2^s <= 1/2``::

        expm([[-F, Sigma], [0, F^T]] h) = [[., G], [0, expm(F h)^T]],   Q_h = expm(F h) G

    then ``s`` doublings ``Q_2h = A_h Q_h A_h^T + Q_h``, ``A_2h = A_h A_h``. Each doubling adds
    positive semi-definite terms, so Q keeps its relative accuracy for long gaps, where the
    block exponential alone would subtract numbers of size ``exp(2 |F| dt)`` (and the
    Lyapunov form ``P_inf - A P_inf A^T`` would lose it for a nearly marginal F).
    Differentiable in F, Sigma and the gaps.
    """
    if drift.shape[-2:] != diffusion.shape[-2:] or drift.shape[-1] != drift.shape[-2]:
        raise ValueError(
            f"drift and diffusion must be square (..., D, D) of one size, got "
            f"{tuple(drift.shape)} and {tuple(diffusion.shape)}"
        )
    _positive("gaps", gaps)
    D = drift.shape[-1]
    F, Sigma = drift.unsqueeze(-3), diffusion.unsqueeze(-3)  # (..., 1, D, D)
    with torch.no_grad():
        size = float(torch.linalg.matrix_norm(drift.detach(), ord=1).max()) * float(gaps.max())
    halvings = max(0, math.ceil(math.log2(size / 0.5))) if size > 0.5 else 0
    h = (gaps / 2**halvings)[..., None, None]
    F, Sigma = torch.broadcast_tensors(F, Sigma)
    F, Sigma, h = torch.broadcast_tensors(F, Sigma, h.expand(*h.shape[:-2], D, D))
    block = torch.cat([torch.cat([-F, Sigma], -1), torch.cat([torch.zeros_like(F), F.mT], -1)], -2)
    exp = torch.linalg.matrix_exp(block * h.repeat(*(1,) * (h.dim() - 2), 2, 2))
    A = exp[..., D:, D:].mT
    Q = A @ exp[..., :D, D:]
    Q = 0.5 * (Q + Q.mT)
    for _ in range(halvings):
        Q = A @ Q @ A.mT + Q
        Q = 0.5 * (Q + Q.mT)
        A = A @ A
    return A, Q


def _smoother(
    nu: float,
    values: Tensor,
    times: Tensor,
    lengthscale: Tensor,
    variance: Tensor,
    noise: Tensor | float,
    mask: Tensor | None,
    method: str,
) -> ssm.KalmanSmootherResult:
    gaps = check_times(times)
    if not isinstance(values, Tensor) or values.shape[-1:] != times.shape[-1:]:
        raise ValueError(f"values must have shape (..., T) with T = {times.shape[-1]}")
    noise = torch.as_tensor(noise, dtype=values.dtype, device=values.device)
    _positive("noise", noise, allow_zero=True)
    A, Q, P = matern_discretisation(nu, lengthscale, variance, gaps)
    d = P.shape[-1]
    H = torch.zeros(1, d, dtype=values.dtype, device=values.device)
    H[0, 0] = 1.0
    R = noise.expand(values.shape)[..., None, None]
    return ssm.kalman_smoother(
        values[..., None],
        A,
        Q,
        H,
        R,
        torch.zeros(P.shape[:-1], dtype=P.dtype, device=P.device),
        P,
        mask=mask,
        method=method,
    )


def matern_log_marginal(
    nu: float,
    values: Tensor,
    times: Tensor,
    lengthscale: Tensor,
    variance: Tensor,
    noise: Tensor | float = 0.0,
    mask: Tensor | None = None,
    method: str = "sequential",
) -> Tensor:
    """``log N(y | 0, K + diag(noise))`` of a zero-mean Matérn GP at ``times`` in O(T).

    :param values: ``y (..., T)``; ``noise``: scalar or ``(..., T)`` observation variances
        (0: the GP's own density, which the filter handles since every predicted variance is
        positive); ``mask (..., T)``: True where ``y`` is observed.
    :returns: ``(...)``.
    """
    return _smoother(nu, values, times, lengthscale, variance, noise, mask, method).log_normalizer


def matern_regression(
    nu: float,
    values: Tensor,
    times: Tensor,
    lengthscale: Tensor,
    variance: Tensor,
    noise: Tensor | float,
    mask: Tensor | None = None,
    method: str = "sequential",
) -> tuple[Tensor, Tensor]:
    """GP regression of ``y_t = f(t_t) + e_t``, ``e_t ~ N(0, noise_t)`` in O(T): the posterior
    means and marginal variances of f at every stamp, ``(..., T)`` each."""
    result = _smoother(nu, values, times, lengthscale, variance, noise, mask, method)
    return result.smoothed_means[..., 0], result.smoothed_covs[..., 0, 0]

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

Two more tools over time stamps live here:

- dense GP kernels by name (:func:`gp_kernel`, gpytorch kernels: ``"cauchy"``, ``"rbf"``,
  ``"matern12"/"32"/"52"``), their covariance matrices (:func:`kernel_matrix`) and the settings
  under which gpytorch factorises them exactly by Cholesky (:func:`exact_gp_settings`), as the
  GP-VAE and SGP-BAE use them;
- :func:`natural_cubic_spline`, interpolation through the observed rows of irregularly sampled
  sequences. It sits beside the GP tools because it is one: the natural cubic spline is the
  noise-free posterior mean of GP regression under an integrated-Wiener prior with a flat prior
  on the linear trend (Wahba 1978), the smoothest member of the regression family above, and
  like them it works on any spacing of the stamps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pvae import ssm, validation

__all__ = [
    "KERNELS",
    "NUS",
    "exact_gp_settings",
    "gp_kernel",
    "kernel_matrix",
    "natural_cubic_spline",
    "check_times",
    "lti_discretisation",
    "matern_discretisation",
    "matern_log_marginal",
    "matern_regression",
    "matern_sde",
    "process_noise",
    "state_dim",
]

NUS = (0.5, 1.5, 2.5)
KERNELS = ("cauchy", "rbf", "matern12", "matern32", "matern52")


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
    return A, process_noise(A, P), P


def process_noise(A: Tensor, P: Tensor) -> Tensor:
    """``Q (..., T-1, d, d) = P_inf - A P_inf A^T`` of a stationary SDE's transitions
    ``A (..., T-1, d, d)`` and stationary covariance ``P_inf (..., d, d)``, symmetrised, with
    the jitter ``10 eps diag(P_inf)`` of :func:`matern_discretisation`."""
    Pk = P.unsqueeze(-3)
    Q = Pk - A @ Pk @ A.mT
    Q = 0.5 * (Q + Q.mT)
    jitter = 10 * torch.finfo(Q.dtype).eps * P.diagonal(dim1=-2, dim2=-1)
    return Q + torch.diag_embed(jitter).unsqueeze(-3)


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


# ---------------------------------------------------------------------------------------------
# Dense kernels (gpytorch), factorised exactly
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_gp_settings(max_size: int = 10**9) -> Iterator[None]:
    """gpytorch settings under which covariances are factorised by Cholesky, never by
    conjugate gradients or Lanczos: ``max_cholesky_size(max_size)`` (gpytorch's default is 800
    points) and ``fast_computations`` off for log-probabilities, solves and root
    decompositions."""
    import gpytorch

    with contextlib.ExitStack() as stack:
        stack.enter_context(gpytorch.settings.max_cholesky_size(max_size))
        stack.enter_context(
            gpytorch.settings.fast_computations(
                covar_root_decomposition=False, log_prob=False, solves=False
            )
        )
        yield


def gp_kernel(name: str = "cauchy", length_scale: float = 2.0, scale: float = 1.0) -> nn.Module:
    """A gpytorch kernel ``s^2 k_l(t, t')`` by name (a ``ScaleKernel`` around the base kernel).

    :param name: one of :data:`KERNELS`. ``"cauchy"`` is ``s^2 / (1 + (t - t')^2 / l^2)``:
        gpytorch's ``RQKernel`` with alpha = 1 (fixed) and lengthscale ``l / sqrt(2)``.
    :param length_scale: l, in the units of the time stamps.
    :param scale: s (the kernel's output scale is ``s^2``).
    """
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    import gpytorch

    for label, value in (("length_scale", length_scale), ("scale", scale)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be a positive number, got {value!r}")
    base: Any
    if name == "cauchy":
        base = gpytorch.kernels.RQKernel()
        base.alpha = 1.0
        base.raw_alpha.requires_grad_(False)
        base.lengthscale = length_scale / math.sqrt(2)
    elif name == "rbf":
        base = gpytorch.kernels.RBFKernel()
        base.lengthscale = length_scale
    else:
        base = gpytorch.kernels.MaternKernel(nu={"12": 0.5, "32": 1.5, "52": 2.5}[name[-2:]])
        base.lengthscale = length_scale
    kernel = gpytorch.kernels.ScaleKernel(base)
    kernel.outputscale = scale**2
    return kernel


def kernel_matrix(kernel: nn.Module, times: Tensor, jitter: float = 0.0) -> Tensor:
    """The dense covariance ``k(t_i, t_j) + jitter * delta_ij``, ``(..., T, T)`` for ``times
    (..., T)`` (evaluated under :func:`exact_gp_settings`)."""
    with exact_gp_settings():
        covariance = kernel(times[..., None]).to_dense()
    if jitter:
        covariance = covariance + jitter * torch.eye(
            times.shape[-1], dtype=covariance.dtype, device=covariance.device
        )
    return covariance


# ---------------------------------------------------------------------------------------------
# Natural cubic splines through observed rows
# ---------------------------------------------------------------------------------------------


def natural_cubic_spline(times: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Interpolate each sequence through its observed rows, evaluated at every row.

    Per sequence with knots ``t_0 < ... < t_{n-1}`` (the rows where ``mask`` is True) the
    natural cubic spline has second derivatives ``M`` solving, for ``0 < i < n - 1``,

        h_{i-1} M_{i-1} + 2 (h_{i-1} + h_i) M_i + h_i M_{i+1}
            = 6 ((y_{i+1} - y_i) / h_i - (y_i - y_{i-1}) / h_{i-1}),  M_0 = M_{n-1} = 0,

    with ``h_i = t_{i+1} - t_i``; all sequences are solved at once (padded knots get the rows
    ``M_i = 0``). Before the first and after the last knot the value is held constant; a
    sequence with one observed row is constant, one with none is zero.

    :param times: ``(B, T)`` increasing.
    :param values: ``(B, T, C)`` (entries at hidden rows are ignored).
    :param mask: ``(B, T)`` bool, True = observed.
    :returns: ``(B, T, C)``, equal to ``values`` at observed rows.
    """
    B, T, C = values.shape
    dtype = values.dtype
    count = mask.sum(1)  # knots per sequence
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # observed first
    valid = torch.arange(T, device=values.device) < count[:, None]  # (B, T) real knot
    knot_t = times.to(dtype).gather(1, order)
    knot_y = values.gather(1, order[..., None].expand(B, T, C))
    # pad: knots after the last real one repeat its time + 1, 2, ... (never used for values)
    last = (count - 1).clamp(min=0)
    last_t = knot_t.gather(1, last[:, None])
    pad_t = last_t + (torch.arange(T, device=values.device) - last[:, None]).to(dtype)
    knot_t = torch.where(valid, knot_t, pad_t)
    knot_y = torch.where(
        valid[..., None], knot_y, knot_y.gather(1, last[:, None, None].expand(B, 1, C))
    )
    h = (knot_t[:, 1:] - knot_t[:, :-1]).clamp(min=1e-12)  # (B, T-1)
    slope = (knot_y[:, 1:] - knot_y[:, :-1]) / h[..., None]  # (B, T-1, C)
    index = torch.arange(T, device=values.device)
    interior = (index[None, :] >= 1) & (index[None, :] < count[:, None] - 1)  # (B, T)
    system = torch.zeros(B, T, T, dtype=dtype, device=values.device)
    rhs = torch.zeros(B, T, C, dtype=dtype, device=values.device)
    rows = index[1:-1]
    h_prev, h_next = h[:, :-1], h[:, 1:]  # (B, T-2)
    inner = interior[:, 1:-1]
    system[:, rows, rows - 1] = torch.where(inner, h_prev, 0.0)
    system[:, rows, rows] = torch.where(inner, 2 * (h_prev + h_next), 1.0)
    system[:, rows, rows + 1] = torch.where(inner, h_next, 0.0)
    system[:, 0, 0] = 1.0
    system[:, -1, -1] = 1.0
    rhs[:, 1:-1] = torch.where(inner[..., None], 6 * (slope[:, 1:] - slope[:, :-1]), 0.0)
    second = torch.linalg.solve(system, rhs)  # (B, T, C)
    # evaluate at every row's time
    query = times.to(dtype)
    upper = (count - 2).clamp(min=0)
    interval = torch.searchsorted(knot_t.contiguous(), query.contiguous(), right=True) - 1
    interval = torch.minimum(interval.clamp(min=0), upper[:, None])  # (B, T)
    t0 = knot_t.gather(1, interval)
    t1 = knot_t.gather(1, (interval + 1).clamp(max=T - 1))
    gather = interval[..., None].expand(B, T, C)
    y0, y1 = knot_y.gather(1, gather), knot_y.gather(1, (gather + 1).clamp(max=T - 1))
    m0, m1 = second.gather(1, gather), second.gather(1, (gather + 1).clamp(max=T - 1))
    width = (t1 - t0).clamp(min=1e-12)[..., None]
    a = ((t1 - query)[..., None] / width).clamp(0, 1)
    b = 1.0 - a
    spline = a * y0 + b * y1 + ((a**3 - a) * m0 + (b**3 - b) * m1) * width**2 / 6
    first_t = knot_t[:, :1]
    before = query < first_t
    after = query > last_t
    spline = torch.where(before[..., None], knot_y[:, :1], spline)
    spline = torch.where(
        after[..., None], knot_y.gather(1, last[:, None, None].expand(B, 1, C)), spline
    )
    spline = torch.where((count <= 1)[:, None, None], knot_y[:, :1].expand(B, T, C), spline)
    spline = torch.where((count == 0)[:, None, None], torch.zeros_like(spline), spline)
    return torch.where(mask[..., None], values, spline)

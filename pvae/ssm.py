"""Linear-Gaussian state-space models: the Kalman filter, the RTS smoother and their sampler.

The model, with column vectors (matrices multiply from the left, ``A @ x``)::

    x_1 ~ N(initial_loc, initial_cov)                     the state at the FIRST step
    x_t = A_t x_{t-1} + q_t,     q_t ~ N(0, Q_t)          t = 2..T
    y_t = H_t x_t + r_t,         r_t ~ N(0, R_t)          t = 1..T, where observed

Two conventions differ from Pyro's ``GaussianHMM``: there the initial distribution is the state
*before* the first step, and matrices multiply from the right (``x @ A``).

Shapes (``...`` are batch dimensions; they broadcast against each other):

- ``y``: ``(..., T, M)``; ``mask``: ``(..., T)`` bool, True = observed (a missing step
  contributes nothing; its ``y`` may hold anything, NaN included).
- ``transition_matrix`` A and ``transition_cov`` Q: ``(D, D)`` shared by every step, or
  ``(..., T-1, D, D)`` one per transition (irregular time grids); with three or more
  dimensions the third from last is always the transition index (size ``T-1`` or 1).
- ``observation_matrix`` H: ``(M, D)`` or ``(..., T, M, D)``; ``observation_cov`` R:
  ``(M, M)`` or ``(..., T, M, M)``. The per-step form is the *Gaussian-potential* form that
  structured guides use: an encoder emits pseudo-observations ``y~_t`` with their own
  covariances ``V~_t`` (see :func:`diagonal_potentials` for ``H = I``, diagonal ``V~_t``).
- ``initial_loc`` m_1: ``(..., D)``; ``initial_cov`` P_1: ``(..., D, D)``.

Two methods compute the same numbers:

- ``"sequential"``: the Kalman filter (Joseph-form covariance update, Cholesky solves) and the
  Rauch-Tung-Striebel smoother as loops over time; memory O(T D^2) for the results.
- ``"parallel"``: the associative scans of Särkkä & García-Fernández (2021, "Temporal
  parallelization of Bayesian smoothers"), filtering elements and smoothing elements, each
  combined in O(log T) depth with batched torch operations.

The smoothed posterior is Markov backwards in time::

    x_T | y ~ N(m^s_T, P^s_T),   x_t | x_{t+1}, y ~ N(E_t x_{t+1} + g_t, L_t)
    E_t = P_t A_{t+1}^T (A_{t+1} P_t A_{t+1}^T + Q_{t+1})^{-1},
    g_t = m_t - E_t A_{t+1} m_t,   L_t = (I - E_t A_{t+1}) P_t (I - E_t A_{t+1})^T + E_t Q E_t^T

(``m_t, P_t`` filtered), which gives the RTS recursions, the lag-one cross-covariances
``Cov(x_{t+1}, x_t | y) = P^s_{t+1} E_t^T`` and reparameterised joint samples (backward
sampling, itself an affine recursion). With Gaussian potentials ``N(y~_t | H_t x_t, V~_t)``
in place of observations, ``log_normalizer`` is ``log Z = log ∫ p(x) prod_t N(...) dx`` and
the KL between the smoothed posterior q and the prior p is (:func:`posterior_prior_kl`)::

    KL(q || p) = sum_t E_q[log N(y~_t | H_t x_t, V~_t)] - log Z.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KalmanSmootherResult",
    "diagonal_potentials",
    "expected_log_potentials",
    "kalman_smoother",
    "posterior_prior_kl",
]

METHODS = ("sequential", "parallel")
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# Small linear-algebra helpers (time or batch dimensions lead, matrices trail)


def _mv(matrix: Tensor, vector: Tensor) -> Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _sym(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.mT)


def _psd_cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor of a positive semi-definite matrix, with the smallest jitter needed.

    A singular covariance (a noiseless direction) gets ``eps * mean diagonal`` added, raised
    tenfold until the factorisation succeeds; well-conditioned inputs are untouched.
    """
    tril, info = torch.linalg.cholesky_ex(cov)
    if not bool(info.any()):
        return tril
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1.0)[..., None, None]
    jitter = torch.finfo(cov.dtype).eps * 10
    for _ in range(12):
        tril, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if not bool(info.any()):
            return tril
        jitter *= 10
    raise ValueError("a covariance is not positive semi-definite (Cholesky failed with jitter)")


def _gaussian_log_density(residual: Tensor, tril: Tensor) -> Tensor:
    """``log N(residual; 0, tril tril^T)`` over the last dimension."""
    white = torch.linalg.solve_triangular(tril, residual.unsqueeze(-1), upper=False).squeeze(-1)
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (residual.shape[-1] * _LOG_2PI + white.pow(2).sum(-1)) - half_log_det


# --------------------------------------------------------------------------------------------
# Input checks and the time-first layout used inside


@dataclass
class _Inputs:
    """Arguments in time-first layout: ``(T or T-1 or 1, *batch, ...)``, batch dims padded."""

    y: Tensor  # (T, *B, M), zero at missing steps
    mask: Tensor | None  # (T, *B) bool
    A: Tensor  # (T-1 or 1, *b, D, D)
    Q: Tensor
    H: Tensor  # (T or 1, *b, M, D)
    R: Tensor  # (T or 1, *b, M, M)
    m1: Tensor  # (*b, D)
    P1: Tensor  # (*b, D, D)
    batch_shape: torch.Size
    num_steps: int
    state_dim: int


def _check_matrix(name: str, value: Tensor, rows: int, cols: int, steps: int) -> Tensor:
    """A ``(rows, cols)`` or ``(..., steps or 1, rows, cols)`` tensor, returned time-first."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 2 or value.shape[-2:] != (rows, cols):
        raise ValueError(
            f"{name} must have shape ({rows}, {cols}) or (..., {steps}, {rows}, {cols}), "
            f"got {tuple(value.shape)}"
        )
    if value.dim() == 2:
        return value.unsqueeze(0)
    if value.shape[-3] not in (1, steps):
        raise ValueError(
            f"{name}: the third dimension from the end indexes steps and must be {steps} or 1, "
            f"got shape {tuple(value.shape)}"
        )
    return value.movedim(-3, 0)


def _pad(value: Tensor, lead: int, batch_dims: int, trail: int) -> Tensor:
    """Insert singleton batch dimensions so that ``value`` has ``batch_dims`` of them."""
    missing = batch_dims - (value.dim() - lead - trail)
    shape = value.shape
    return value.reshape(shape[:lead] + (1,) * missing + shape[lead:])


def _prepare(
    y: Tensor,
    transition_matrix: Tensor,
    transition_cov: Tensor,
    observation_matrix: Tensor,
    observation_cov: Tensor,
    initial_loc: Tensor,
    initial_cov: Tensor,
    mask: Tensor | None,
) -> _Inputs:
    if not isinstance(y, Tensor) or y.dim() < 2:
        raise ValueError(f"y must be a tensor of shape (..., T, M), got {getattr(y, 'shape', y)}")
    if not y.dtype.is_floating_point:
        raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
    num_steps, obs_dim = y.shape[-2:]
    if num_steps < 1:
        raise ValueError("y must have at least one time step")
    if not isinstance(initial_loc, Tensor) or initial_loc.dim() < 1:
        raise ValueError("initial_loc must be a tensor of shape (..., D)")
    state_dim = initial_loc.shape[-1]
    A = _check_matrix("transition_matrix", transition_matrix, state_dim, state_dim, num_steps - 1)
    Q = _check_matrix("transition_cov", transition_cov, state_dim, state_dim, num_steps - 1)
    H = _check_matrix("observation_matrix", observation_matrix, obs_dim, state_dim, num_steps)
    R = _check_matrix("observation_cov", observation_cov, obs_dim, obs_dim, num_steps)
    if not isinstance(initial_cov, Tensor) or initial_cov.shape[-2:] != (state_dim, state_dim):
        raise ValueError(
            f"initial_cov must have shape (..., {state_dim}, {state_dim}), "
            f"got {tuple(getattr(initial_cov, 'shape', ()))}"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor of shape (..., T), True = observed")
        if mask.dim() < 1 or mask.shape[-1] != num_steps:
            raise ValueError(f"mask must have shape (..., {num_steps}), got {tuple(mask.shape)}")
    try:
        batch_shape = torch.broadcast_shapes(
            y.shape[:-2],
            A.shape[1:-2],
            Q.shape[1:-2],
            H.shape[1:-2],
            R.shape[1:-2],
            initial_loc.shape[:-1],
            initial_cov.shape[:-2],
            mask.shape[:-1] if mask is not None else (),
        )
    except RuntimeError as error:
        raise ValueError(f"batch dimensions of the arguments do not broadcast: {error}") from None
    nb = len(batch_shape)
    y_t = _pad(y.movedim(-2, 0), 1, nb, 1).expand((num_steps, *batch_shape, obs_dim))
    mask_t = None
    if mask is not None:
        mask_t = _pad(mask.movedim(-1, 0), 1, nb, 0).expand((num_steps, *batch_shape))
        y_t = torch.where(mask_t.unsqueeze(-1), y_t, torch.zeros((), dtype=y.dtype))
    return _Inputs(
        y=y_t,
        mask=mask_t,
        A=_pad(A, 1, nb, 2),
        Q=_pad(Q, 1, nb, 2),
        H=_pad(H, 1, nb, 2),
        R=_pad(R, 1, nb, 2),
        m1=_pad(initial_loc, 0, nb, 1),
        P1=_pad(initial_cov, 0, nb, 2),
        batch_shape=batch_shape,
        num_steps=num_steps,
        state_dim=state_dim,
    )


def _step(value: Tensor, t: int) -> Tensor:
    return value[t if value.shape[0] > 1 else 0]


def _per_step(value: Tensor, steps: int) -> Tensor:
    """``value`` with its leading (step) dimension expanded to ``steps``."""
    return value.expand((steps, *value.shape[1:]))


# --------------------------------------------------------------------------------------------
# Result


@dataclass
class KalmanSmootherResult:
    """What :func:`kalman_smoother` returns (batch dimensions ``...`` lead).

    Attributes:
        log_normalizer: ``(...)`` log p(observed y) (with potentials: log Z).
        filtered_means, filtered_covs: ``(..., T, D)``, ``(..., T, D, D)``: x_t | y_{1:t}.
        smoothed_means, smoothed_covs: ``(..., T, D)``, ``(..., T, D, D)``: x_t | y_{1:T}.
        smoothed_cross_covs: ``(..., T-1, D, D)``, entry t is Cov(x_{t+1}, x_t | y_{1:T})
            (0-based t), the lag-one smoothed cross-covariance.
        backward_gains, backward_offsets, backward_covs: ``E_t, g_t, L_t`` of the backward
            conditionals ``x_t | x_{t+1}, y ~ N(E_t x_{t+1} + g_t, L_t)``, ``(..., T-1, ...)``.
        method: the method that computed them (sampling uses the same one).
    """

    log_normalizer: Tensor
    filtered_means: Tensor
    filtered_covs: Tensor
    smoothed_means: Tensor
    smoothed_covs: Tensor
    smoothed_cross_covs: Tensor
    backward_gains: Tensor
    backward_offsets: Tensor
    backward_covs: Tensor
    method: str

    def sample(self, num_samples: int = 1) -> Tensor:
        """Reparameterised joint draws from the smoothed posterior, ``(num_samples, ..., T, D)``.

        Backward sampling: ``x_T = m^s_T + chol(P^s_T) e_T``, then
        ``x_t = E_t x_{t+1} + g_t + chol(L_t) e_t`` with standard normal ``e``
        (from torch's global generator, which ``pyro.set_rng_seed`` seeds).
        """
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        return self.rsample(torch.Size([int(num_samples)]))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Like :meth:`sample` with any ``sample_shape``: ``(*sample_shape, ..., T, D)``."""
        sample_shape = torch.Size(sample_shape)
        means = self.smoothed_means
        noise = torch.randn(sample_shape + means.shape, dtype=means.dtype, device=means.device)
        return self.transform_noise(noise)

    def transform_noise(self, noise: Tensor) -> Tensor:
        """The joint posterior draw that standard normal ``noise`` ``(*S, ..., T, D)`` maps to."""
        batch_dims = self.smoothed_means.dim() - 2
        sample_dims = noise.dim() - 2 - batch_dims
        last_tril = _psd_cholesky(self.smoothed_covs[..., -1, :, :])
        trils = _psd_cholesky(self.backward_covs)
        # time-first; the affine recursion runs backwards from T
        eps = noise.movedim(-2, 0)  # (T, *S, ..., D)
        last = self.smoothed_means[..., -1, :] + _mv(last_tril, eps[-1])

        def time_first(matrices: Tensor) -> Tensor:  # (T-1, *1s for samples, ..., D, D)
            matrices = matrices.movedim(-3, 0)
            return matrices.reshape(matrices.shape[:1] + (1,) * sample_dims + matrices.shape[1:])

        offsets = self.backward_offsets.movedim(-2, 0)
        offsets = offsets.reshape(offsets.shape[:1] + (1,) * sample_dims + offsets.shape[1:])
        offsets = offsets + _mv(time_first(trils), eps[:-1])
        gains = time_first(self.backward_gains)
        c = torch.cat([last.unsqueeze(0), offsets.flip(0)])
        E = torch.cat([torch.zeros_like(gains[:1]), gains.flip(0)])
        x = _affine_recursion(E, c, self.method).flip(0)
        return x.movedim(0, -2)


# --------------------------------------------------------------------------------------------
# Associative scan


Elements = tuple[Tensor, ...]


def _associative_scan(combine: Callable[[Elements, Elements], Elements], elems: Elements):
    """Inclusive scan along dimension 0 in O(log T) depth (odd-even recursion).

    ``combine(a, b)`` merges element ``a`` (earlier) with element ``b`` (later), batched along
    dimension 0; it must be associative.
    """
    n = elems[0].shape[0]
    if n < 2:
        return elems
    reduced = combine(tuple(e[0:-1:2] for e in elems), tuple(e[1::2] for e in elems))
    odd = _associative_scan(combine, reduced)  # results at positions 1, 3, 5, ...
    if n % 2 == 0:
        even = combine(tuple(o[:-1] for o in odd), tuple(e[2::2] for e in elems))
    else:
        even = combine(odd, tuple(e[2::2] for e in elems))
    out = []
    for e, ev, od in zip(elems, even, odd, strict=True):
        evens = torch.cat([e[:1], ev])  # positions 0, 2, 4, ...
        paired = torch.stack([evens[: od.shape[0]], od], dim=1).flatten(0, 1)
        out.append(paired if n % 2 == 0 else torch.cat([paired, evens[-1:]]))
    return tuple(out)


def _combine_affine(a: Elements, b: Elements) -> Elements:
    """Compose ``x -> E_a x + c_a`` then ``x -> E_b x + c_b``."""
    Ea, ca = a
    Eb, cb = b
    return Eb @ Ea, _mv(Eb, ca) + cb


def _affine_recursion(E: Tensor, c: Tensor, method: str) -> Tensor:
    """``x_0 = c_0``, ``x_k = E_k x_{k-1} + c_k`` along dimension 0 (``E_0`` is ignored)."""
    if method == "parallel":
        return _associative_scan(_combine_affine, (E, c))[1]
    xs = [c[0]]
    for k in range(1, c.shape[0]):
        xs.append(_mv(E[k], xs[-1]) + c[k])
    return torch.stack(xs)


def _combine_smoothing(a: Elements, b: Elements) -> Elements:
    """Compose backward conditionals (Särkkä & García-Fernández 2021, smoothing elements)."""
    Ea, ga, La = a
    Eb, gb, Lb = b
    return Eb @ Ea, _mv(Eb, ga) + gb, _sym(Eb @ La @ Eb.mT) + Lb


def _combine_filtering(a: Elements, b: Elements) -> Elements:
    """Combine filtering elements ``(A, b, C, eta, J)``, ``a`` earlier than ``b``.

    Särkkä & García-Fernández (2021), Lemma 8, with ``M = I + C_a J_b``::

        A = A_b M^{-1} A_a,  b = A_b M^{-1} (b_a + C_a eta_b) + b_b,  C = A_b M^{-1} C_a A_b^T + C_b
        eta = A_a^T M^{-T} (eta_b - J_b b_a) + eta_a,  J = A_a^T M^{-T} J_b A_a + J_a
    """
    Aa, ba, Ca, eta_a, Ja = a
    Ab, bb, Cb, eta_b, Jb = b
    eye = torch.eye(Aa.shape[-1], dtype=Aa.dtype, device=Aa.device)
    M_inv = torch.linalg.inv(eye + Ca @ Jb)
    Z = Ab @ M_inv  # A_b M^{-1}
    W = Aa.mT @ M_inv.mT  # A_a^T M^{-T}
    A = Z @ Aa
    b_ = _mv(Z, ba + _mv(Ca, eta_b)) + bb
    C = _sym(Z @ Ca @ Ab.mT) + Cb
    eta = _mv(W, eta_b - _mv(Jb, ba)) + eta_a
    J = _sym(W @ Jb @ Aa) + Ja
    return A, b_, C, eta, J


# --------------------------------------------------------------------------------------------
# Filters


def _update(m: Tensor, P: Tensor, y: Tensor, H: Tensor, R: Tensor):
    """Kalman update of ``N(m, P)`` by ``y ~ N(H x, R)``: Joseph form, Cholesky solves.

    Returns the updated moments and ``log N(y; H m, H P H^T + R)``.
    """
    PHt = P @ H.mT
    S = _sym(H @ PHt) + R
    tril = torch.linalg.cholesky(S)
    K = torch.cholesky_solve(PHt.mT, tril).mT  # P H^T S^{-1}
    residual = y - _mv(H, m)
    m_new = m + _mv(K, residual)
    IKH = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device) - K @ H
    P_new = _sym(IKH @ P @ IKH.mT + K @ R @ K.mT)
    return m_new, P_new, _gaussian_log_density(residual, tril)


def _filter_sequential(inp: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    T = inp.num_steps
    m, P = inp.m1, inp.P1
    means, covs = [], []
    log_normalizer = torch.zeros((), dtype=inp.y.dtype, device=inp.y.device)
    for t in range(T):
        if t > 0:
            A = _step(inp.A, t - 1)
            m = _mv(A, m)
            P = _sym(A @ P @ A.mT) + _step(inp.Q, t - 1)
        m_new, P_new, log_density = _update(m, P, inp.y[t], _step(inp.H, t), _step(inp.R, t))
        if inp.mask is not None:
            observed = inp.mask[t]
            m = torch.where(observed.unsqueeze(-1), m_new, m)
            P = torch.where(observed[..., None, None], P_new, P)
            log_density = torch.where(observed, log_density, torch.zeros_like(log_density))
        else:
            m, P = m_new, P_new
        log_normalizer = log_normalizer + log_density
        means.append(m.expand(inp.batch_shape + m.shape[-1:]))
        covs.append(P.expand(inp.batch_shape + P.shape[-2:]))
    return torch.stack(means), torch.stack(covs), log_normalizer.expand(inp.batch_shape)


def _filter_parallel(inp: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    T, D = inp.num_steps, inp.state_dim
    shape = (T, *inp.batch_shape)
    H = _per_step(inp.H, T).expand(shape + inp.H.shape[-2:])
    R = _per_step(inp.R, T).expand(shape + inp.R.shape[-2:])
    y = inp.y
    # first element: the initial state updated by y_1
    m1, P1, _ = _update(
        inp.m1.expand(shape[1:] + (D,)),
        inp.P1.expand(shape[1:] + (D, D)),
        y[0],
        H[0],
        R[0],
    )
    if inp.mask is not None:
        m1 = torch.where(inp.mask[0].unsqueeze(-1), m1, inp.m1)
        P1 = torch.where(inp.mask[0][..., None, None], P1, inp.P1)
    zeros_dd = torch.zeros(shape[1:] + (D, D), dtype=y.dtype, device=y.device)
    first = (zeros_dd, m1, P1, torch.zeros_like(m1), zeros_dd)
    if T == 1:
        elements = tuple(e.unsqueeze(0) for e in first)
    else:
        F = _per_step(inp.A, T - 1).expand((T - 1, *shape[1:], D, D))
        Q = _per_step(inp.Q, T - 1).expand((T - 1, *shape[1:], D, D))
        Hk, Rk, yk = H[1:], R[1:], y[1:]
        HQ = Hk @ Q
        S = _sym(HQ @ Hk.mT) + Rk
        tril = torch.linalg.cholesky(S)
        K = torch.cholesky_solve(HQ, tril).mT  # Q H^T S^{-1}
        HF = Hk @ F
        white_HF = torch.linalg.solve_triangular(tril, HF, upper=False)  # L^{-1} H F
        white_y = torch.linalg.solve_triangular(tril, yk.unsqueeze(-1), upper=False)
        eta = (white_HF.mT @ white_y).squeeze(-1)  # F^T H^T S^{-1} y
        J = white_HF.mT @ white_HF  # F^T H^T S^{-1} H F
        if inp.mask is not None:
            observed = inp.mask[1:]
            K = K * observed[..., None, None]
            eta = eta * observed.unsqueeze(-1)
            J = J * observed[..., None, None]
        IKH = torch.eye(D, dtype=y.dtype, device=y.device) - K @ Hk
        A_el = IKH @ F
        b_el = _mv(K, yk)
        C_el = _sym(IKH @ Q @ IKH.mT + K @ Rk @ K.mT)
        elements = tuple(
            torch.cat([f.unsqueeze(0), e])
            for f, e in zip(first, (A_el, b_el, C_el, eta, J), strict=True)
        )
    _, means, covs, _, _ = _associative_scan(_combine_filtering, elements)
    # log normaliser from the one-step predictive distributions of the filtered moments
    if T > 1:
        F = _per_step(inp.A, T - 1)
        pred_m = torch.cat([inp.m1.expand(shape[1:] + (D,)).unsqueeze(0), _mv(F, means[:-1])])
        pred_P = torch.cat(
            [
                inp.P1.expand(shape[1:] + (D, D)).unsqueeze(0),
                _sym(F @ covs[:-1] @ F.mT) + _per_step(inp.Q, T - 1),
            ]
        )
    else:
        pred_m = inp.m1.expand(shape[1:] + (D,)).unsqueeze(0)
        pred_P = inp.P1.expand(shape[1:] + (D, D)).unsqueeze(0)
    S = _sym(H @ pred_P @ H.mT) + R
    log_density = _gaussian_log_density(y - _mv(H, pred_m), torch.linalg.cholesky(S))
    if inp.mask is not None:
        log_density = torch.where(inp.mask, log_density, torch.zeros_like(log_density))
    return means, covs, log_density.sum(0)


# --------------------------------------------------------------------------------------------
# Smoother


def _backward_elements(inp: _Inputs, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``E_t, g_t, L_t`` of ``x_t | x_{t+1}, y_{1:t}`` for t = 1..T-1, time-first."""
    T, D = inp.num_steps, inp.state_dim
    F = _per_step(inp.A, T - 1)
    Q = _per_step(inp.Q, T - 1)
    m, P = means[:-1], covs[:-1]
    FP = F @ P
    pred_P = _sym(FP @ F.mT) + Q
    E = torch.cholesky_solve(FP, _psd_cholesky(pred_P)).mT  # P F^T (F P F^T + Q)^{-1}
    g = m - _mv(E, _mv(F, m))
    IEF = torch.eye(D, dtype=m.dtype, device=m.device) - E @ F
    L = _sym(IEF @ P @ IEF.mT + E @ Q @ E.mT)  # Joseph form of P - E (F P F^T + Q) E^T
    return E, g, L


def kalman_smoother(
    y: Tensor,
    transition_matrix: Tensor,
    transition_cov: Tensor,
    observation_matrix: Tensor,
    observation_cov: Tensor,
    initial_loc: Tensor,
    initial_cov: Tensor,
    mask: Tensor | None = None,
    method: str = "sequential",
) -> KalmanSmootherResult:
    """Kalman filter and RTS smoother of a linear-Gaussian state-space model.

    See the module docstring for the model, the conventions and the shapes. ``method`` is
    ``"sequential"`` (loops over time) or ``"parallel"`` (associative scans, O(log T) depth);
    both are exact and differentiable in every argument, in float32 and float64.

    Returns:
        A :class:`KalmanSmootherResult` with ``log_normalizer`` ``(...)``, filtered and smoothed
        means ``(..., T, D)`` and covariances ``(..., T, D, D)``, the lag-one smoothed
        cross-covariances ``(..., T-1, D, D)`` and ``sample(num_samples)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inp = _prepare(
        y,
        transition_matrix,
        transition_cov,
        observation_matrix,
        observation_cov,
        initial_loc,
        initial_cov,
        mask,
    )
    T = inp.num_steps
    if method == "parallel":
        means, covs, log_normalizer = _filter_parallel(inp)
    else:
        means, covs, log_normalizer = _filter_sequential(inp)

    if T > 1:
        E, g, L = _backward_elements(inp, means, covs)
        if method == "parallel":
            elements = (
                torch.cat([torch.zeros_like(E[:1]), E.flip(0)]),
                torch.cat([means[-1:], g.flip(0)]),
                torch.cat([covs[-1:], L.flip(0)]),
            )
            _, smoothed_means, smoothed_covs = _associative_scan(_combine_smoothing, elements)
            smoothed_means, smoothed_covs = smoothed_means.flip(0), smoothed_covs.flip(0)
        else:
            ms, Ps = [means[-1]], [covs[-1]]
            for k in range(T - 2, -1, -1):
                ms.append(_mv(E[k], ms[-1]) + g[k])
                Ps.append(_sym(E[k] @ Ps[-1] @ E[k].mT) + L[k])
            smoothed_means, smoothed_covs = torch.stack(ms[::-1]), torch.stack(Ps[::-1])
        cross = smoothed_covs[1:] @ E.mT  # Cov(x_{t+1}, x_t | y)
    else:
        smoothed_means, smoothed_covs = means, covs
        E = covs.new_zeros((0, *covs.shape[1:]))
        g = means.new_zeros((0, *means.shape[1:]))
        L = cross = E

    def batch_first(value: Tensor, trail: int) -> Tensor:
        return value.movedim(0, -1 - trail)

    return KalmanSmootherResult(
        log_normalizer=log_normalizer,
        filtered_means=batch_first(means, 1),
        filtered_covs=batch_first(covs, 2),
        smoothed_means=batch_first(smoothed_means, 1),
        smoothed_covs=batch_first(smoothed_covs, 2),
        smoothed_cross_covs=batch_first(cross, 2),
        backward_gains=batch_first(E, 2),
        backward_offsets=batch_first(g, 1),
        backward_covs=batch_first(L, 2),
        method=method,
    )


# --------------------------------------------------------------------------------------------
# Gaussian potentials and the KL


def diagonal_potentials(loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Potentials ``N(loc_t | x_t, diag(scale_t^2))`` on the state itself (``H = I``).

    ``loc`` and ``scale`` are ``(..., T, D)`` (an encoder's per-step outputs). Returns
    ``(y, observation_matrix, observation_cov)`` for :func:`kalman_smoother`: ``loc``, the
    ``(D, D)`` identity and ``(..., T, D, D)`` diagonal covariances.
    """
    if loc.dim() < 2:
        raise ValueError(f"loc must have shape (..., T, D), got {tuple(loc.shape)}")
    loc, scale = torch.broadcast_tensors(loc, scale)
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
    return loc, eye, torch.diag_embed(scale.pow(2))


def expected_log_potentials(
    result: KalmanSmootherResult,
    y: Tensor,
    observation_matrix: Tensor,
    observation_cov: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """``sum_t E_q[log N(y_t | H_t x_t, R_t)]`` under the smoothed marginals, shape ``(...)``.

    ``E_q[log N(y | H x, R)] = log N(y | H m^s, R) - tr(R^{-1} H P^s H^T) / 2``; missing steps
    (``mask`` False) are left out.
    """
    H = observation_matrix
    R = observation_cov
    if H.dim() == 2:
        H = H.expand(result.smoothed_means.shape[-2:-1] + H.shape)
    if R.dim() == 2:
        R = R.expand(result.smoothed_means.shape[-2:-1] + R.shape)
    tril = torch.linalg.cholesky(R)
    residual = y - _mv(H, result.smoothed_means)
    if mask is not None:
        residual = torch.where(mask.unsqueeze(-1), residual, torch.zeros_like(residual))
    white_H = torch.linalg.solve_triangular(tril, H, upper=False)
    trace = (white_H @ result.smoothed_covs @ white_H.mT).diagonal(dim1=-2, dim2=-1).sum(-1)
    terms = _gaussian_log_density(residual, tril) - 0.5 * trace
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum(-1)


def posterior_prior_kl(
    result: KalmanSmootherResult,
    y: Tensor,
    observation_matrix: Tensor,
    observation_cov: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Closed-form ``KL(q || p)`` of the smoothed posterior q from the prior p it was built on.

    With ``q(x) = p(x) prod_t N(y_t | H_t x_t, R_t) / Z``:
    ``KL(q || p) = sum_t E_q[log N(y_t | H_t x_t, R_t)] - log Z``. Shape ``(...)``.
    """
    expected = expected_log_potentials(result, y, observation_matrix, observation_cov, mask)
    return expected - result.log_normalizer

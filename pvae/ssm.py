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

- ``"sequential"``: the Kalman filter (Cholesky factor of the innovation covariance, whitened
  residuals; the log normaliser is summed after the loop) and the Rauch-Tung-Striebel smoother
  as loops over time; memory O(T D^2) for the results. The covariance (Riccati) recursion is
  one loop that autograd does not record, with its adjoint recursion as the backward pass
  (:class:`_Riccati`); the linear recursions (filtered and smoothed means, smoothed
  covariances, sampling) run blockwise from :data:`_BLOCKED_FROM` steps on
  (:func:`_blocked_recursion`: the loop's sums regrouped, O(sqrt T) tensor operations).
- ``"parallel"``: the associative scans of Särkkä & García-Fernández (2021, "Temporal
  parallelization of Bayesian smoothers"), filtering elements and smoothing elements, each
  combined in O(log T) depth with batched torch operations.

Cost: whatever does not involve the data (covariances, gains, the backward gains E_t and
covariances L_t) keeps only the batch dimensions of the model's matrices, so a model shared by a
batch of sequences is filtered once for all of them, and products with a matrix shared by every
step run as one matrix product instead of a batch of small ones; the returned covariances are
then expanded views over the batch.

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

from pvae import validation

__all__ = [
    "KalmanSmootherResult",
    "diagonal_potentials",
    "expected_log_potentials",
    "kalman_smoother",
    "posterior_prior_kl",
]

METHODS = ("sequential", "parallel", "auto")
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# Small linear-algebra helpers (time or batch dimensions lead, matrices trail)


def _mv(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` over the last dimensions, broadcasting the leading ones.

    When the matrix is shared across the vector's innermost batch dimension (size 1 there),
    the vectors are stacked as the rows of one product per matrix instead of a batch of
    matrix-vector products (same numbers, far fewer tiny kernels).
    """
    if _shared(matrix):
        out = vector @ matrix.reshape(matrix.shape[-2:]).mT
        shape = _broadcast(matrix.shape[:-2], vector.shape[:-1])
        return out if out.shape[:-1] == shape else out.reshape(shape + out.shape[-1:])
    if matrix.dim() >= 3 and vector.dim() >= 2 and matrix.shape[-3] == 1 < vector.shape[-2]:
        out = vector @ matrix.squeeze(-3).mT
        shape = _broadcast(matrix.shape[:-2], vector.shape[:-1])
        return out if out.shape[:-1] == shape else out.expand(shape + out.shape[-1:])
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _broadcast(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` for plain sizes, without its symbolic-shape machinery
    (which costs tens of microseconds a call, a noticeable share of a small product)."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return torch.Size(out)


def _shared(value: Tensor) -> bool:
    """Whether every dimension but the last two has size 1 (one matrix for all)."""
    return all(size == 1 for size in value.shape[:-2])


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with broadcasting; a factor shared by the whole batch makes it one product.

    torch folds ``(N, i, j) @ (j, k)`` into a single ``(N i, j) @ (j, k)`` product, while a
    broadcast ``(1, j, k)`` factor would run ``N`` tiny products; the transpose handles a shared
    left factor.
    """
    if _shared(a) == _shared(b):
        return a @ b
    shape = _broadcast(a.shape[:-2], b.shape[:-2])
    if _shared(b):
        out = a @ b.reshape(b.shape[-2:])
    else:
        out = (b.mT @ a.reshape(a.shape[-2:]).mT).mT
    return out if out.shape[:-2] == shape else out.reshape(shape + out.shape[-2:])


def _solve_lower(tril: Tensor, vector: Tensor) -> Tensor:
    """``tril^{-1} vector`` over the last dimension (``tril`` lower triangular), broadcasting.

    A factor shared by the batch is inverted once and applied as one product; one shared across
    the vector's innermost batch dimension solves for all those vectors as columns at once.
    """
    if _shared(tril):
        tril = tril.reshape(tril.shape[-2:])
        eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
        inverse = torch.linalg.solve_triangular(tril, eye, upper=False)
        return _mv(inverse, vector) if vector.dim() == 1 else vector @ inverse.mT
    if vector.dim() >= 2 and tril.shape[-3] == 1 < vector.shape[-2]:
        return torch.linalg.solve_triangular(tril.squeeze(-3), vector.mT, upper=False).mT
    return torch.linalg.solve_triangular(tril, vector.unsqueeze(-1), upper=False).squeeze(-1)


def _sym(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.mT)


def _sym_add(matrix: Tensor, other: Tensor) -> Tensor:
    """``_sym(matrix) + other`` in two operations (the same numbers: halving is exact)."""
    return torch.add(other, matrix + matrix.mT, alpha=0.5)


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


COVARIANCES = ("transition_cov", "observation_cov", "initial_cov")


def _check_values(y: Tensor, arguments: dict[str, Tensor], mask: Tensor | None) -> None:
    """Refuse, before any work, what the filter would turn into a wrong number or a raw error.

    - half precision (torch has no Cholesky factor for it): ``TypeError``;
    - NaN/inf in a parameter, or in ``y`` at an observed step (missing steps may hold
      anything: they are never read);
    - a covariance (Q, R, P_1: one matrix or a stack) that is not symmetric (per matrix,
      ``max |C - C^T| > sqrt(eps) max |C|``: the filter would read one triangle in some
      places and the whole matrix in others, so the methods would disagree) or not positive
      semi-definite (its Cholesky factor fails after a shift of ``sqrt(eps) max |C|``, i.e.
      an eigenvalue below about ``-sqrt(eps) max |C|``). Singular covariances, all-zero ones
      included, are valid models (``R = 0``: exact observations, as :mod:`pvae.gp` uses for
      noise 0; ``Q = 0``: deterministic dynamics); only a combination whose innovation
      covariance ``H P H^T + R`` is singular is refused, during the filter, naming the
      all-zero arguments.

    Vectorised over steps and batch, with a single device-to-host transfer when everything is
    fine; the offending argument and the first offending index are looked up only on failure.
    """
    for name, value in {"y": y, **arguments}.items():
        if value.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"kalman_smoother computes in float32 or float64 (torch has no half-precision "
                f"Cholesky factor); {name} is {value.dtype}: convert it with .float()"
            )
    with torch.no_grad():
        observed_y = y.detach()
        if mask is not None:
            observed_y = torch.where(mask.unsqueeze(-1), observed_y, 0.0)
        flags = [~torch.isfinite(observed_y).all()]
        flags += [~torch.isfinite(v.detach()).all() for v in arguments.values()]
        shapes = {name: _covariance_problems(arguments[name]) for name in COVARIANCES}
        flags += [bad.any() for pair in shapes.values() for bad in pair]
        if not bool(torch.stack(flags).any()):
            return
        bad_y = ~torch.isfinite(observed_y)
        if bool(bad_y.any()):
            where = validation._multi_index(int(bad_y.flatten().nonzero()[0]), bad_y.shape)
            raise ValueError(
                f"y must be finite at observed steps; y{list(where)} = "
                f"{float(observed_y[where])} (a missing step may hold NaN when mask is False "
                "there)"
            )
        for name, value in arguments.items():
            finite = torch.isfinite(value.detach())
            if not bool(finite.all()):
                where = validation._multi_index(int((~finite).flatten().nonzero()[0]), value.shape)
                raise ValueError(
                    f"{name} must be finite; {name}{list(where)} = {float(value[where])}"
                )
        for name, problems in shapes.items():
            for bad, what in zip(problems, _PROBLEMS, strict=True):
                if bool(bad.any()):
                    where = validation._multi_index(int(bad.flatten().nonzero()[0]), bad.shape)
                    at = f"{name}{list(where)}" if where else name
                    matrix = arguments[name].detach()[where]
                    raise ValueError(f"{name} must be {what}; {at} is not:\n{matrix}")


_PROBLEMS = ("a symmetric covariance matrix", "a positive semi-definite covariance matrix")


def _covariance_problems(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Per-matrix flags ``(...)`` of ``cov (..., n, n)`` in the order of ``_PROBLEMS``: not
    symmetric, not PSD (see :func:`_check_values` for the tolerances); non-finite matrices
    are flagged elsewhere; an all-zero matrix passes (see :class:`_SingularInnovation`)."""
    c = torch.nan_to_num(cov.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    size = c.abs().amax((-2, -1))
    tolerance = torch.finfo(c.dtype).eps ** 0.5 * size
    asymmetric = (c - c.mT).abs().amax((-2, -1)) > tolerance
    shift = torch.where(size > 0, tolerance, torch.ones_like(size))
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    _, info = torch.linalg.cholesky_ex(_sym(c) + shift[..., None, None] * eye)
    return asymmetric, (info > 0) & ~asymmetric


class _SingularInnovation(Exception):
    """The predicted observation covariance ``H P H^T + R`` has no Cholesky factor."""


def _innovation_cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor of an innovation covariance; :class:`_SingularInnovation` when it is
    singular (e.g. ``R = 0`` observing a state with ``P = 0``), which
    :func:`kalman_smoother` turns into an error that names the zero arguments."""
    tril, info = torch.linalg.cholesky_ex(cov)
    if bool(info.any()):
        raise _SingularInnovation
    return tril


def _singular_innovation_error(arguments: dict[str, Tensor]) -> ValueError:
    zero = [name for name in COVARIANCES if not bool(arguments[name].detach().any())]
    which = f" ({' and '.join(zero)} all zero)" if zero else ""
    return ValueError(
        "the predicted observation covariance H P H^T + R is singular at some step"
        f"{which}: an exact observation of a state known exactly. Give observation_cov, or "
        "initial_cov and transition_cov, some variance in the observed directions"
    )


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
    _check_values(
        y,
        {
            "transition_matrix": transition_matrix,
            "transition_cov": transition_cov,
            "observation_matrix": observation_matrix,
            "observation_cov": observation_cov,
            "initial_loc": initial_loc,
            "initial_cov": initial_cov,
        },
        mask,
    )
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


# --------------------------------------------------------------------------------------------
# Result


@dataclass
class KalmanSmootherResult:
    """What :func:`kalman_smoother` returns (batch dimensions ``...`` lead).

    :ivar log_normalizer: ``(...)`` log p(observed y) (with potentials: log Z).
    :ivar filtered_means, filtered_covs: ``(..., T, D)``, ``(..., T, D, D)``: x_t | y_{1:t}.
    :ivar smoothed_means, smoothed_covs: ``(..., T, D)``, ``(..., T, D, D)``: x_t | y_{1:T}.
    :ivar smoothed_cross_covs: ``(..., T-1, D, D)``, entry t is Cov(x_{t+1}, x_t | y_{1:T})
        (0-based t), the lag-one smoothed cross-covariance.
    :ivar backward_gains, backward_offsets, backward_covs: ``E_t, g_t, L_t`` of the backward
        conditionals ``x_t | x_{t+1}, y ~ N(E_t x_{t+1} + g_t, L_t)``, ``(..., T-1, ...)``.
    :ivar method: the method that computed them (sampling uses the same one).
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
        num_samples = validation.positive_int(num_samples, "num_samples")
        return self.rsample(torch.Size([num_samples]))

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
    """``x_0 = c_0``, ``x_k = E_k x_{k-1} + c_k`` along dimension 0 (``E_0`` is ignored).

    ``E`` is ``(K or 1, *b, D, D)``, ``c`` is ``(K, *B, D)``. ``"parallel"``: an associative
    scan; ``"sequential"``: the loop, evaluated blockwise above :data:`_BLOCKED_FROM` steps
    (:func:`_blocked_recursion`: the same recursion in O(sqrt K) batched operations).
    """
    if method == "parallel":
        return _associative_scan(_combine_affine, (E, c))[1]
    count = c.shape[0]
    if count == 1:
        return c
    if count >= _BLOCKED_FROM:
        return _blocked_recursion(E, c)[0]
    xs, cs = [c[0]], c.unbind(0)
    if all(size == 1 for size in E.shape[1:-2]) and c.dim() <= 3:  # addmv / addmm per step
        E = E.reshape((E.shape[0], *E.shape[-2:]))
        if c.dim() == 2:
            Es = _steps(E, count)
            for k in range(1, count):
                xs.append(torch.addmv(cs[k], Es[k], xs[-1]))
        else:
            Et = _steps(E.mT, count)
            for k in range(1, count):
                xs.append(torch.addmm(cs[k], xs[-1], Et[k]))
    else:
        Es = _steps(E, count)
        for k in range(1, count):
            xs.append(_mv(Es[k], xs[-1]) + cs[k])
    return torch.stack(xs)


_BLOCKED_FROM = 24


def _blocked_recursion(
    E: Tensor, c: Tensor, C: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The sequential recursions ``x_k = E_k x_{k-1} + c_k`` and, when ``C`` is given,
    ``X_k = sym(E_k X_{k-1} E_k^T) + C_k`` (``x_0 = c_0``, ``X_0 = C_0``; ``E_0`` ignored),
    evaluated in blocks of ``b ~ sqrt(K)`` steps.

    ``E`` ``(K or 1, *b, D, D)``, ``c`` ``(K, *B, D)``, ``C`` ``(K, *b', D, D)``. Within each
    block the recursion runs from zero with all blocks batched, together with the products
    ``G_j = E_j ... E_0`` of the block's matrices; a loop over the blocks carries the state
    from each block's end to the next (``z_i = G z_{i-1} + y``); one batched step adds the
    carried state to every position (``x = y + G z``, ``X = Y + G Z G^T``). These are the
    loop's sums regrouped (the same terms, rounded in another order), in about ``3 sqrt(K)``
    tensor operations instead of ``K``, so autograd records as few.
    """
    K = c.shape[0]
    b = max(2, math.isqrt(K - 1) + 1)
    n = -(-K // b)
    pad = n * b - K

    def blocks(value: Tensor) -> Tensor:  # (K, ...) -> (b, n, ...): position in block first
        if pad:
            value = torch.cat([value, value.new_zeros((pad, *value.shape[1:]))])
        return value.reshape((n, b, *value.shape[1:])).transpose(0, 1)

    # (b, n, ...) unbound once: indexing one position at a time would make autograd
    # allocate a zero gradient of the whole tensor per position
    shared = E.shape[0] == 1
    Eb = [E[0]] * b if shared else blocks(E).unbind(0)  # (*b, D, D) or (n, *b, D, D)
    cb = blocks(c).unbind(0)
    Cb = None if C is None else blocks(C).unbind(0)
    ys, Gs = [cb[0]], [Eb[0]]
    Ys: list[Tensor] = [] if Cb is None else [Cb[0]]
    for j in range(1, b):
        Ej = Eb[j]
        ys.append(_mv(Ej, ys[-1]) + cb[j])
        if Cb is not None:
            Ys.append(_sym_add(_mm(_mm(Ej, Ys[-1]), Ej.mT), Cb[j]))
        Gs.append(_mm(Ej, Gs[-1]))
    G = torch.stack(Gs)  # (b, *b, D, D) shared or (b, n, *b, D, D)
    G_last = G[-1] if not shared else G[-1].unsqueeze(0)  # (n or 1, *b, D, D)
    y_last = ys[-1]  # (n, *B, D)
    carried = [y_last[0]]
    ends = G_last.unbind(0) if not shared else [G_last[0]] * n
    y_ends = y_last.unbind(0)
    for i in range(1, n - 1):
        carried.append(_mv(ends[i], carried[-1]) + y_ends[i])
    z_prev = torch.stack([torch.zeros_like(carried[0]), *carried][:n])  # (n, *B, D): z_{i-1}
    y = torch.stack(ys)  # (b, n, *B, D)
    Gn = G.unsqueeze(1) if shared else G  # (b, n or 1, *b, D, D)
    x = y + _mv(Gn, z_prev.unsqueeze(0))
    x = x.transpose(0, 1).reshape((n * b, *x.shape[2:]))[:K]
    if Cb is None:
        return x, None
    Y_last = Ys[-1]
    Y_ends = Y_last.unbind(0)
    Z = [Y_ends[0]]
    for i in range(1, n - 1):
        Z.append(_sym_add(_mm(_mm(ends[i], Z[-1]), ends[i].mT), Y_ends[i]))
    Z_prev = torch.stack([torch.zeros_like(Z[0]), *Z][:n]).unsqueeze(0)  # (1, n, *b', D, D)
    Y = torch.stack(Ys)  # (b, n, *b', D, D)
    X = _sym_add(_mm(_mm(Gn, Z_prev), Gn.mT), Y)
    X = X.transpose(0, 1).reshape((n * b, *X.shape[2:]))[:K]
    return x, X


def _combine_smoothing(a: Elements, b: Elements) -> Elements:
    """Compose backward conditionals (Särkkä & García-Fernández 2021, smoothing elements)."""
    Ea, ga, La = a
    Eb, gb, Lb = b
    return Eb @ Ea, _mv(Eb, ga) + gb, _sym_add(Eb @ La @ Eb.mT, Lb)


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
    C = _sym_add(Z @ Ca @ Ab.mT, Cb)
    eta = _mv(W, eta_b - _mv(Jb, ba)) + eta_a
    J = _sym_add(W @ Jb @ Aa, Ja)
    return A, b_, C, eta, J


# --------------------------------------------------------------------------------------------
# Filters


def _update(m: Tensor, P: Tensor, y: Tensor, H: Tensor, R: Tensor, observed: Tensor | None):
    """Kalman update of ``N(m, P)`` by ``y ~ N(H x, R)``; ``m`` and ``y`` are columns ``(..., 1)``.

    With ``S = H P H^T + R = L L^T`` and ``V = L^{-1} H P`` (so the gain is ``K = V^T L^{-1}``)::

        m' = m + V^T w,   P' = P - V^T V,   w = L^{-1} (y - H m)  (the whitened residual)

    ``observed`` (``(...)`` bool or None) zeroes the gain where a step is missing. Returns
    ``m', P', w, L``; ``log N(y; H m, S) = -(M log 2 pi + |w|^2) / 2 - sum log diag L``.
    """
    HP = H @ P
    tril = _innovation_cholesky(HP @ H.mT + R)
    V = torch.linalg.solve_triangular(tril, HP, upper=False)
    white = torch.linalg.solve_triangular(tril, y - H @ m, upper=False)
    if observed is not None:
        V = V * observed[..., None, None]
    Vt = V.mT
    return m + Vt @ white, P - Vt @ V, white, tril


def _log_normalizer(white: Tensor, tril: Tensor, mask: Tensor | None, batch_shape) -> Tensor:
    """``sum_t log N(y_t; predicted)`` from whitened residuals ``(T, ..., M)`` and factors."""
    quad = white.pow(2).sum(-1)
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    terms = -0.5 * (white.shape[-1] * _LOG_2PI + quad) - half_log_det
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(0).expand(batch_shape)


def _steps(value: Tensor, count: int) -> list[Tensor]:
    """The per-step slices of a time-first tensor, repeated when it is shared by all steps."""
    parts = list(value.unbind(0))
    return parts if len(parts) == count else parts * count


_SETTLE_EVERY = 4


def _settled(new: Tensor, old: Tensor) -> bool:
    """Whether one step of a covariance recursion moved it by rounding only: at most 4 ulps
    of its largest entry (the full recursion keeps wandering at that level step after step)."""
    tolerance = 4 * torch.finfo(new.dtype).eps * float(new.detach().abs().max())
    return bool(((new - old).detach().abs() <= tolerance).all())


def _covariance_filter(inp: _Inputs) -> tuple[Tensor, Tensor, Tensor, int]:
    """The data-free half of the Kalman filter.

    Returns the filtered covariances ``P_t`` ``(T, ..., D, D)``, the innovation factors
    ``L_t`` (``H_t P^-_t H_t^T + R_t = L_t L_t^T``) and ``V_t = L_t^{-1} H_t P^-_t`` (zero at
    missing steps), with the batch dimensions of the model's matrices and the mask only, and
    the first step from which all three stay the same (``T`` if none). The Riccati recursion
    of the predicted covariances ``P^-_t`` is one loop (:class:`_Riccati`, its own backward
    pass); ``L_t``, ``V_t`` and ``P_t = P^-_t - V_t^T V_t`` follow for all steps at once. A
    model shared by all steps with every step observed reaches its steady state: once a step
    (one in :data:`_SETTLE_EVERY`) moves the predicted covariance by no more than rounding
    (:func:`_settled`), every later step would repeat it to rounding, and the loop stops.
    """
    T = inp.num_steps
    every = inp.mask is None or bool(inp.mask.all())  # an all-True mask is no mask here
    observed = None if every else inp.mask.to(inp.P1.dtype)  # type: ignore[union-attr]
    can_settle = every and all(v.shape[0] == 1 for v in (inp.A, inp.Q, inp.H, inp.R))
    predicted = _Riccati.apply(inp.P1, inp.A, inp.Q, inp.H, inp.R, observed, T, can_settle)
    distinct = predicted.shape[0]
    H = inp.H if inp.H.shape[0] == 1 else inp.H[:distinct]
    R = inp.R if inp.R.shape[0] == 1 else inp.R[:distinct]
    HP = _mm(H, predicted)
    tril = _innovation_cholesky(_mm(HP, H.mT) + R)
    V = torch.linalg.solve_triangular(tril, HP, upper=False)
    if observed is not None:
        V = V * observed[..., None, None]
    covs = predicted - V.mT @ V
    if distinct == T:
        return covs, tril, V, T
    repeat = T - distinct

    def extend(value: Tensor) -> Tensor:
        return torch.cat([value, value[-1:].expand((repeat, *value.shape[1:]))])

    return extend(covs), extend(tril), extend(V), distinct - 1


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad`` summed over the dimensions where a tensor of ``shape`` was broadcast."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class _Riccati(torch.autograd.Function):
    """The predicted covariances ``P^-_t`` ``(T', *b, D, D)`` of the Kalman filter, as a loop
    that autograd does not record, with the adjoint recursion as its backward pass.

    Forward, t = 1..T (``P^-_1 = P_1``; ``S = H P^- H^T + R``, ``K = P^- H^T S^{-1}`` (zero
    at a missing step), ``J = I - K H``)::

        P_t = P^-_t - K_t S_t K_t^T                 (the update)
        P^-_{t+1} = sym(A_t P_t A_t^T) + Q_t        (the prediction)

    Backward, with ``G_t`` the incoming gradient of ``P^-_t``: the update's differential is
    ``J dP^- J^T + K dR K^T - P_t dH^T K^T - K dH P_t``, so the adjoints are
    ``Lambda_t = G_t + J_t^T Gamma_t J_t`` and ``Gamma_t = A_t^T sym(Lambda_{t+1}) A_t`` (the
    gradient of ``P_t``), one loop backwards; then, for all steps at once,
    ``dQ_t = sym(Lambda_{t+1})``, ``dA_t = 2 sym(Lambda_{t+1}) A_t sym(P_t)``,
    ``dR_t = K_t^T Gamma_t K_t``, ``dH_t = -2 K_t^T Gamma_t P_t`` and ``dP_1 = Lambda_1``.

    ``T' = T`` unless ``can_settle`` and the recursion settles (see
    :func:`_covariance_filter`): then ``T'`` is one past the settled step, which later steps
    repeat. ``*b`` are the batch dimensions of the model's matrices and of ``observed``
    ``(T, *B)`` (a float mask, 1 = observed; None: every step).
    """

    @staticmethod
    def forward(ctx, P1, A, Q, H, R, observed, T, can_settle):  # type: ignore[override]
        batch = _broadcast(
            P1.shape[:-2],
            A.shape[1:-2],
            Q.shape[1:-2],
            H.shape[1:-2],
            R.shape[1:-2],
            () if observed is None else observed.shape[1:],
        )
        ctx.shapes = (P1.shape, Q.shape)
        inputs = (A, H, R, observed)
        # detached: views of tensors that require grad are slow to make, even without grad
        P1, A, Q, H, R = (value.detach() for value in (P1, A, Q, H, R))
        transitions = max(T - 1, 1)
        D = P1.shape[-1]
        flat = math.prod(batch) == 1  # one model for the whole batch: 2-D products (mm)
        mm = torch.mm if flat else torch.matmul

        def steps(value: Tensor, count: int) -> list[Tensor]:
            if flat:
                value = value.reshape((value.shape[0], *value.shape[-2:])).contiguous()
            return _steps(value, count)

        As, Ats, Qs = steps(A, transitions), steps(A.mT, transitions), steps(Q, transitions)
        Hs, Hts, Rs = steps(H, T), steps(H.mT, T), steps(R, T)
        seen: list = [None] * T
        if observed is not None:
            seen = list((observed.reshape(T) if flat else observed[..., None, None]).unbind(0))
        P = P1.reshape(D, D) if flat else P1.expand(batch + P1.shape[-2:])
        predicted, updated = [P], []
        for t in range(T):
            if t:
                P = mm(mm(As[t - 1], P), Ats[t - 1])
                P = torch.add(Qs[t - 1], P + P.mT, alpha=0.5)
                predicted.append(P)
                if can_settle and t >= 2 and t % _SETTLE_EVERY == 0:
                    if _settled(P, predicted[-2]):
                        break
            HP = mm(Hs[t], P)
            tril = torch.linalg.cholesky_ex(mm(HP, Hts[t]) + Rs[t])[0]
            V = torch.linalg.solve_triangular(tril, HP, upper=False)
            if seen[t] is not None:
                V = V * seen[t]
            P = P - mm(V.mT, V)
            updated.append(P)
        if flat:
            predicted = [P.reshape(batch + (D, D)) for P in predicted]
            updated = [P.reshape(batch + (D, D)) for P in updated]
        out = torch.stack(predicted)
        ctx.save_for_backward(*inputs, out)
        ctx.updated = torch.stack(updated)  # not an output: no reference cycle
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        A, H, R, observed, predicted = (
            None if value is None else value.detach() for value in ctx.saved_tensors
        )
        updated = ctx.updated
        P1_shape, Q_shape = ctx.shapes
        n = predicted.shape[0]
        grads: list[Tensor | None] = [None] * 8
        if n == 1:
            grads[0] = _reduce_to(grad[0], P1_shape)
            return tuple(grads)
        # the update's gain K_t and J_t = I - K_t H_t at the steps whose P_t is used
        P_used, updated = predicted[:-1], updated[: n - 1]
        H_n = H if H.shape[0] == 1 else H[: n - 1]
        R_n = R if R.shape[0] == 1 else R[: n - 1]
        HP = _mm(H_n, P_used)
        tril = torch.linalg.cholesky_ex(_mm(HP, H_n.mT) + R_n)[0]
        V = torch.linalg.solve_triangular(tril, HP, upper=False)
        if observed is not None:
            V = V * observed[: n - 1, ..., None, None]
        K = torch.linalg.solve_triangular(tril.mT, V, upper=True).mT  # (n-1, ..., D, M)
        eye = torch.eye(P_used.shape[-1], dtype=grad.dtype, device=grad.device)
        J = eye - _mm(K, H_n)
        A_n = A if A.shape[0] == 1 else A[: n - 1]
        flat = math.prod(predicted.shape[1:-2]) == 1
        mm = torch.mm if flat else torch.matmul

        def steps(value: Tensor, count: int) -> list[Tensor]:
            if flat:
                value = value.reshape((value.shape[0], *value.shape[-2:])).contiguous()
            return _steps(value, count)

        As, Ats = steps(A_n, n - 1), steps(A_n.mT, n - 1)
        Js, Jts = steps(J, n - 1), steps(J.mT, n - 1)
        sym_grad = steps(_sym(grad), n)
        lam = sym_grad[n - 1]
        lams, gammas = [], []
        for t in range(n - 2, -1, -1):
            lams.append(lam)
            gamma = mm(mm(Ats[t], lam), As[t])
            gammas.append(gamma)
            lam = sym_grad[t] + mm(mm(Jts[t], gamma), Js[t])
        if flat:
            lams = [value.reshape(grad.shape[1:]) for value in lams]
            gammas = [value.reshape(grad.shape[1:]) for value in gammas]
            lam = lam.reshape(grad.shape[1:])
            sym_grad = [sym_grad[0].reshape(grad.shape[1:])]
        grads[0] = _reduce_to(lam - sym_grad[0] + grad[0], P1_shape)
        lam_next = torch.stack(lams[::-1])  # sym(Lambda_{t+1}), t = 1..n-1
        gamma = torch.stack(gammas[::-1])  # the gradient of P_t, t = 1..n-1
        grads[1] = _reduce_to(2 * lam_next @ A_n @ _sym(updated), A.shape)
        grads[2] = _reduce_to(lam_next, Q_shape)
        Kt_gamma = K.mT @ gamma
        dH, dR = -2 * Kt_gamma @ updated, Kt_gamma @ K
        if H.shape[0] > 1:  # the last step's P_T is not used here: no gradient through it
            dH = torch.cat([dH, dH.new_zeros((H.shape[0] - dH.shape[0], *dH.shape[1:]))])
        if R.shape[0] > 1:
            dR = torch.cat([dR, dR.new_zeros((R.shape[0] - dR.shape[0], *dR.shape[1:]))])
        grads[3], grads[4] = _reduce_to(dH, H.shape), _reduce_to(dR, R.shape)
        return tuple(grads)


def _filter_sequential(inp: _Inputs) -> tuple[Tensor, Tensor, Tensor, int]:
    """The Kalman filter as a loop; returns means ``(T, ..., D)``, covariances
    ``(T, ..., D, D)`` (batch dimensions only where they vary), the log normaliser and the
    step from which the covariances are steady (see :func:`_covariance_filter`).

    The covariances do not involve the data; with the gain ``K_t = V_t^T L_t^{-1}`` the means
    are then the affine recursion ``m_t = (I - K_t H_t) A_t m_{t-1} + K_t y_t`` (one fused
    product per step), and the whitened residuals ``w_t = L_t^{-1} (y_t - H_t A_t m_{t-1})``
    of the log normaliser are computed for all steps at once.
    """
    T, D = inp.num_steps, inp.state_dim
    covs, trils, V, steady = _covariance_filter(inp)
    gains = torch.linalg.solve_triangular(trils.mT, V, upper=True).mT  # (T, ..., D, M)
    eye = torch.eye(D, dtype=covs.dtype, device=covs.device)
    G = eye - gains @ inp.H  # (T, ..., D, D): I - K_t H_t
    c = _mv(gains, inp.y)  # (T, *B, D)
    first = _mv(G[0], inp.m1) + c[0]
    if T == 1:
        means = first.unsqueeze(0)
    else:
        F = _mm(G[1:], inp.A)
        E, offsets = _with_first(eye, F, T - 1), _with_first(first, c[1:], T - 1)
        means = _affine_recursion(E, offsets, "sequential")
    predicted = _with_first(inp.m1, _mv(inp.A, means[:-1]), T - 1) if T > 1 else inp.m1[None]
    white = _solve_lower(trils, inp.y - _mv(inp.H, predicted))
    return means, covs, _log_normalizer(white, trils, inp.mask, inp.batch_shape), steady


def _with_first(first: Tensor, rest: Tensor, steps: int) -> Tensor:
    """``first`` (no step dimension) before ``rest`` (``steps`` or 1 steps lead), broadcast."""
    shape = _broadcast(first.shape, rest.shape[1:])
    return torch.cat([first.expand(shape).unsqueeze(0), rest.expand((steps, *shape))])


def _filter_parallel(inp: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    """The filter as an associative scan over Särkkä & García-Fernández's filtering elements.

    Element 1 is the initial state updated by y_1; element t >= 2, with
    ``S = H Q H^T + R = L L^T``, ``G = L^{-1} H``, ``W = G Q`` and ``w = L^{-1} y``, is::

        A = F - W^T G F,  b = W^T w,  C = Q - W^T W,  eta = (G F)^T w,  J = (G F)^T G F

    (a missing step: ``A = F, b = 0, C = Q, eta = 0, J = 0``). Everything that involves no
    data keeps the batch dimensions of the parameters: a model shared by the batch and the
    time steps is computed once.
    """
    T, D = inp.num_steps, inp.state_dim
    mask = inp.mask
    m1, P1, white1, tril1 = _update(
        inp.m1.unsqueeze(-1),
        inp.P1,
        inp.y[0].unsqueeze(-1),
        inp.H[0],
        inp.R[0],
        None if mask is None else mask[0],
    )
    m1, white1 = m1.squeeze(-1), white1.squeeze(-1)
    if T == 1:
        log_normalizer = _log_normalizer(white1[None], tril1[None], mask, inp.batch_shape)
        return m1.unsqueeze(0), P1.unsqueeze(0), log_normalizer
    F, Q, y = inp.A, inp.Q, inp.y[1:]
    H = inp.H[1:] if inp.H.shape[0] > 1 else inp.H
    R = inp.R[1:] if inp.R.shape[0] > 1 else inp.R
    S = _mm(_mm(H, Q), H.mT) + R
    tril = _innovation_cholesky(S)
    G = torch.linalg.solve_triangular(tril, H, upper=False)
    W, GF = _mm(G, Q), _mm(G, F)
    white_y = _solve_lower(tril, y)  # zero at missing steps (y is zeroed there)
    A_el = F - _mm(W.mT, GF)
    C_el = Q - _mm(W.mT, W)
    J_el = _mm(GF.mT, GF)
    b_el = _mv(W.mT, white_y)
    eta_el = _mv(GF.mT, white_y)
    if mask is not None:
        observed = mask[1:, ..., None, None]
        A_el = torch.where(observed, A_el, F)
        C_el = torch.where(observed, C_el, Q)
        J_el = J_el * observed
    zeros = torch.zeros((), dtype=y.dtype, device=y.device)
    elements = (
        _with_first(zeros.expand(D, D), A_el, T - 1),
        _with_first(m1, b_el, T - 1),
        _with_first(P1, C_el, T - 1),
        _with_first(zeros.expand(D), eta_el, T - 1),
        _with_first(zeros.expand(D, D), J_el, T - 1),
    )
    _, means, covs, _, _ = _associative_scan(_combine_filtering, elements)
    # log normaliser: one-step predictions y_t | y_{1:t-1} from the filtered moments, with
    # H F P F^T H^T + (H Q H^T + R) as their covariance
    HF = _mm(H, F)
    pred_tril = _innovation_cholesky(_mm(_mm(HF, covs[:-1]), HF.mT) + S)
    white = _solve_lower(pred_tril, y - _mv(HF, means[:-1]))
    log_normalizer = _log_normalizer(
        _with_first(white1, white, T - 1),
        _with_first(tril1, pred_tril, T - 1),
        mask,
        inp.batch_shape,
    )
    return means, covs, log_normalizer


# --------------------------------------------------------------------------------------------
# Smoother


def _backward_elements(
    inp: _Inputs, means: Tensor, covs: Tensor, steady: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``E_t, g_t, L_t`` of ``x_t | x_{t+1}, y_{1:t}`` for t = 1..T-1, time-first.

    With the prediction ``F P F^T + Q = C C^T`` and ``V = C^{-1} F P``:
    ``E = P F^T (F P F^T + Q)^{-1} = (C^{-T} V)^T``, ``g = m - E F m``, ``L = P - V^T V``.
    ``E`` and ``L`` are computed for the steps before ``steady`` and that one only, and
    repeated after it (the covariances and the model are the same there).
    """
    F, Q = inp.A, inp.Q
    count = covs.shape[0] - 1
    distinct = count if steady is None else min(steady + 1, count)
    m, P = means[:-1], covs[:distinct]
    PFt = _mm(P, F.mT)
    chol = _psd_cholesky(_sym(_mm(F, PFt)) + Q)
    V = torch.linalg.solve_triangular(chol, PFt.mT, upper=False)
    E = torch.linalg.solve_triangular(chol.mT, V, upper=True).mT
    L = _sym(P - V.mT @ V)
    if distinct < count:
        E = torch.cat([E, E[-1:].expand((count - distinct, *E.shape[1:]))])
        L = torch.cat([L, L[-1:].expand((count - distinct, *L.shape[1:]))])
    g = m - _mv(E, _mv(F, m))
    return E, g, L


def _smooth_covariances(E: Tensor, L: Tensor, last: Tensor, steady: int) -> Tensor:
    """The RTS covariance recursion ``P^s_t = E_t P^s_{t+1} E_t^T + L_t`` backwards from
    ``P^s_T = last``, ``(T, ..., D, D)``; ``E_t, L_t`` are the same for ``t >= steady``, so once
    a step there moves ``P^s`` by rounding only, the steps down to ``steady`` repeat it."""
    covs = [last]
    k = E.shape[0] - 1
    while k >= 0:
        gain = E[k]  # indexed when used: the steady steps are skipped
        covs.append(_sym_add(gain @ covs[-1] @ gain.mT, L[k]))
        if k > steady and k % _SETTLE_EVERY == 0 and _settled(covs[-1], covs[-2]):
            covs.extend(covs[-1:] * (k - steady))
            k = steady
        k -= 1
    return torch.stack(torch.broadcast_tensors(*covs[::-1]))


def _smooth(
    inp: _Inputs, means: Tensor, covs: Tensor, method: str, steady: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The smoother from the filtered moments: ``E, g, L``, the smoothed means and
    covariances and the lag-one cross-covariances, time-first (with one step: the filtered
    moments and empty backward elements)."""
    T = inp.num_steps
    if T == 1:
        E = covs.new_zeros((0, *covs.shape[1:]))
        return E, means.new_zeros((0, *means.shape[1:])), E, means, covs, E
    E, g, L = _backward_elements(inp, means, covs, steady)
    if method == "parallel":
        elements = (
            _with_first(torch.zeros_like(E[0]), E.flip(0), T - 1),
            _with_first(means[-1], g.flip(0), T - 1),
            _with_first(covs[-1], L.flip(0), T - 1),
        )
        _, smoothed_means, smoothed_covs = _associative_scan(_combine_smoothing, elements)
        smoothed_means, smoothed_covs = smoothed_means.flip(0), smoothed_covs.flip(0)
    elif T >= _BLOCKED_FROM:  # the RTS recursions of means and covariances, blockwise
        gains = _with_first(torch.zeros_like(E[0]), E.flip(0), T - 1)
        c = _with_first(means[-1], g.flip(0), T - 1)
        C = _with_first(covs[-1], L.flip(0), T - 1)
        smoothed_means, blocked_covs = _blocked_recursion(gains, c, C)
        assert blocked_covs is not None
        smoothed_means, smoothed_covs = smoothed_means.flip(0), blocked_covs.flip(0)
    else:
        zero = torch.zeros_like(E[0])
        c = _with_first(means[-1], g.flip(0), T - 1)
        smoothed_means = _affine_recursion(
            _with_first(zero, E.flip(0), T - 1), c, "sequential"
        ).flip(0)
        smoothed_covs = _smooth_covariances(E, L, covs[-1], steady)
    cross = smoothed_covs[1:] @ E.mT  # Cov(x_{t+1}, x_t | y)
    return E, g, L, smoothed_means, smoothed_covs, cross


AUTO_SEQUENTIAL_MAX_STEPS = 48
AUTO_SEQUENTIAL_SETTLED_FROM = 3000


def _auto_method(inp: _Inputs) -> str:
    """``"sequential"`` up to :data:`AUTO_SEQUENTIAL_MAX_STEPS` steps, ``"parallel"`` above,
    except for a model shared by all steps with every step observed from
    :data:`AUTO_SEQUENTIAL_SETTLED_FROM` steps on, which is sequential again.

    Measured (``benchmarks/kalman_scaling.py``, one thread, D = 4): the loops win below about
    50 steps, where the scans' O(log T) levels of fixed per-level cost dominate. Above, the
    scans win by 1.1-1.4x up to about a thousand steps; a shared model's covariance loop then
    stops at its steady state and the means run blockwise (O(sqrt T) operations), so from a
    few thousand steps on the sequential method is faster (0.6x the scans' time at T = 1e4,
    forward and gradient, batch 1 and 64). A model that varies over time (or a mask) keeps
    the scans: its covariance loop runs every step.
    """
    T = inp.num_steps
    if T <= AUTO_SEQUENTIAL_MAX_STEPS:
        return "sequential"
    shared = inp.mask is None and all(v.shape[0] == 1 for v in (inp.A, inp.Q, inp.H, inp.R))
    return "sequential" if shared and T >= AUTO_SEQUENTIAL_SETTLED_FROM else "parallel"


def kalman_smoother(
    y: Tensor,
    transition_matrix: Tensor,
    transition_cov: Tensor,
    observation_matrix: Tensor,
    observation_cov: Tensor,
    initial_loc: Tensor,
    initial_cov: Tensor,
    mask: Tensor | None = None,
    method: str = "auto",
) -> KalmanSmootherResult:
    """Kalman filter and RTS smoother of a linear-Gaussian state-space model.

    See the module docstring for the model, the conventions and the shapes. ``method`` is
    ``"sequential"`` (loops over time) or ``"parallel"`` (associative scans, O(log T) depth);
    both are exact and differentiable in every argument, in float32 and float64 (first
    derivatives: the sequential covariance loop's hand-written backward pass is not itself
    differentiable, so no gradient of a gradient through it). ``"auto"``
    (the default) picks the faster of the two for the sequence length and whether the model
    is shared by all steps (:func:`_auto_method`).

    :returns: A :class:`KalmanSmootherResult` with ``log_normalizer`` ``(...)``, filtered and
        smoothed means ``(..., T, D)`` and covariances ``(..., T, D, D)``, the lag-one smoothed
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
    T, D = inp.num_steps, inp.state_dim
    if method == "auto":
        method = _auto_method(inp)
    try:
        if method == "parallel":
            means, covs, log_normalizer = _filter_parallel(inp)
            steady = T
        else:
            means, covs, log_normalizer, steady = _filter_sequential(inp)
    except (_SingularInnovation, torch.linalg.LinAlgError):  # the sequential loop factors directly
        arguments = {
            "transition_cov": transition_cov,
            "observation_cov": observation_cov,
            "initial_cov": initial_cov,
        }
        raise _singular_innovation_error(arguments) from None

    E, g, L, smoothed_means, smoothed_covs, cross = _smooth(inp, means, covs, method, steady)

    # covariances carry batch dimensions only where they vary; expanded (views) on return
    vectors, matrices = inp.batch_shape + (inp.state_dim,), inp.batch_shape + (D, D)

    def batch_first(value: Tensor, trail: int) -> Tensor:
        value = value.expand(value.shape[:1] + (vectors if trail == 1 else matrices))
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

"""Pyro distributions over state-space trajectories: the prior and the Kalman-smoothed posterior.

Both have event shape ``(T, D)`` (a whole trajectory ``x_1..x_T``) and batch dimensions in
front, so ``pyro.sample("z", StateSpacePrior(...))`` needs no ``.to_event``. Conventions are
those of :mod:`pvae.ssm`: ``x_1 ~ N(initial_loc, initial_cov)`` is the state at the first step,
``x_t = A_t x_{t-1} + q_t`` with column vectors.

- :class:`StateSpacePrior`: ``log_prob`` by the chain rule, ``rsample`` by the forward
  recursion.
- :class:`KalmanSmoothedPosterior`: the prior times per-step Gaussian potentials
  ``N(y~_t | H_t x_t, V~_t)`` (what a structured encoder emits), normalised:
  ``q(x) = p(x) prod_t N(y~_t | H_t x_t, V~_t) / Z``. Its ``log_prob`` is exact (the posterior
  is Gaussian), ``rsample`` is reparameterised backward sampling, ``mean``/``variance`` are
  the smoothed marginals.
- ``kl_divergence(KalmanSmoothedPosterior, StateSpacePrior)`` is registered in closed form:
  ``sum_t E_q[log N(y~_t | H_t x_t, V~_t)] - log Z`` when p has the parameters of the
  posterior's own prior (equal values, not necessarily the same object), and
  ``-H[q] - E_q[log p(x)]`` (smoothed marginals and lag-one cross-covariances) for any other
  state-space prior. So ELBO, IWAE, ``pvae.log_likelihood`` and ``pvae.fit`` use them as they
  use any other pair of distributions.
- :class:`LinearGaussianEmission`: ``p(y | x) = prod_t N(y_t | C x_t + d, R)`` over observed
  steps, event shape ``(T, M)``, declaring which latent site ``x`` is. Its
  ``expected_log_prob(q, y)`` is the closed form of ``E_q[log p(y | x)]`` under a
  :class:`KalmanSmoothedPosterior` q, which :class:`pvae.inference.KalmanELBO` uses in place of
  Monte-Carlo draws.
- :class:`MarkovianPrior`: independent Ornstein-Uhlenbeck GPs per channel in this state-space
  form, with the interface of :class:`pvae.distributions.temporal.TemporalPrior` (the
  multimodal GP-VAE's time-domain prior).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn
from torch.distributions import constraints, register_kl

from pvae import ssm

from ._checks import positive_float as _positive_float
from ._checks import positive_int as _positive_int

__all__ = [
    "KalmanSmoothedPosterior",
    "LinearGaussianEmission",
    "MarkovianPrior",
    "StateSpacePrior",
    "same_state_space_prior",
]

_LOG_2PI = math.log(2 * math.pi)
_NO_PRECISION = 1e-10  # precision of an absent potential where a finite one is needed
_Shape = torch.Size | list[int] | tuple[int, ...]


def _steps_first_shape(value: Tensor, name: str, trail: int) -> Tensor:
    """A shared ``(rows, cols)`` matrix as ``(1, rows, cols)``; others unchanged."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.unsqueeze(0) if value.dim() == trail else value


def _batch_of(value: Tensor, trail: int) -> torch.Size:
    return value.shape[: value.dim() - trail]


def _expand_batch(value: Tensor, batch_shape: torch.Size, trail: int) -> Tensor:
    return value.expand(batch_shape + value.shape[value.dim() - trail :])


def _expected_log_normal(residual: Tensor, cov: Tensor, tril: Tensor) -> Tensor:
    """``E[log N(x; mu, S)]`` for ``x - mu`` with mean ``residual`` and covariance ``cov``,
    ``S = tril tril^T``: ``-(D log 2 pi + log|S| + tr(S^{-1} (cov + r r^T))) / 2``."""
    second = cov + residual.unsqueeze(-1) * residual.unsqueeze(-2)
    white = torch.linalg.solve_triangular(tril, second, upper=False)
    trace = torch.linalg.solve_triangular(tril, white.mT, upper=False).diagonal(dim1=-2, dim2=-1)
    log_det = 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (residual.shape[-1] * _LOG_2PI + log_det + trace.sum(-1))


class StateSpacePrior(TorchDistribution):
    """``p(x_1..x_T)`` of a linear-Gaussian state-space model, event shape ``(T, D)``.

    :param transition_matrix: A, ``(D, D)`` or ``(..., T-1, D, D)`` (``(..., 1, D, D)``: shared).
    :param transition_cov: Q, same shapes.
    :param initial_loc: ``(..., D)``, the mean of x_1.
    :param initial_cov: ``(..., D, D)``, the covariance of x_1.
    :param num_steps: T.
    :param method: ``"sequential"`` or ``"parallel"`` (:func:`pvae.ssm.kalman_smoother`), used
        by ``rsample`` and by posteriors built on this prior.

    ``log_prob(x) = log N(x_1; m_1, P_1) + sum_{t>1} log N(x_t; A_t x_{t-1}, Q_t)``.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        transition_matrix: Tensor,
        transition_cov: Tensor,
        initial_loc: Tensor,
        initial_cov: Tensor,
        num_steps: int,
        method: str = "sequential",
        validate_args: bool | None = None,
    ):
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
        if method not in ssm.METHODS:
            raise ValueError(f"method must be one of {ssm.METHODS}, got {method!r}")
        T = int(num_steps)
        A = _steps_first_shape(transition_matrix, "transition_matrix", 2)
        Q = _steps_first_shape(transition_cov, "transition_cov", 2)
        if not isinstance(initial_loc, Tensor) or initial_loc.dim() < 1:
            raise ValueError("initial_loc must be a tensor of shape (..., D)")
        D = initial_loc.shape[-1]
        for name, value in (("transition_matrix", A), ("transition_cov", Q)):
            if value.shape[-2:] != (D, D) or value.shape[-3] not in (1, max(T - 1, 1)):
                raise ValueError(
                    f"{name} must have shape ({D}, {D}) or (..., {T - 1}, {D}, {D}), "
                    f"got {tuple(value.shape)}"
                )
        if not isinstance(initial_cov, Tensor) or initial_cov.shape[-2:] != (D, D):
            raise ValueError(f"initial_cov must have shape (..., {D}, {D})")
        try:
            batch_shape = torch.broadcast_shapes(
                _batch_of(A, 3), _batch_of(Q, 3), initial_loc.shape[:-1], initial_cov.shape[:-2]
            )
        except RuntimeError as error:
            raise ValueError(
                f"batch dimensions of the arguments do not broadcast: {error}"
            ) from None
        self.transition_matrix = A
        self.transition_cov = Q
        self.initial_loc = initial_loc
        self.initial_cov = initial_cov
        self.num_steps = T
        self.method = method
        super().__init__(batch_shape, torch.Size([T, D]), validate_args=validate_args)

    @property
    def state_dim(self) -> int:
        return self.event_shape[-1]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(StateSpacePrior, _instance)
        new.transition_matrix = _expand_batch(self.transition_matrix, batch_shape, 3)
        new.transition_cov = _expand_batch(self.transition_cov, batch_shape, 3)
        new.initial_loc = _expand_batch(self.initial_loc, batch_shape, 1)
        new.initial_cov = _expand_batch(self.initial_cov, batch_shape, 2)
        new.num_steps = self.num_steps
        new.method = self.method
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _transition_trils(self) -> tuple[Tensor, Tensor]:
        return torch.linalg.cholesky(self.initial_cov), torch.linalg.cholesky(self.transition_cov)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        first_tril, trils = self._transition_trils()
        first = ssm._gaussian_log_density(value[..., 0, :] - self.initial_loc, first_tril)
        if self.num_steps == 1:
            return first
        residual = value[..., 1:, :] - ssm._mv(self.transition_matrix, value[..., :-1, :])
        return first + ssm._gaussian_log_density(residual, trils).sum(-1)

    def rsample(self, sample_shape: _Shape = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        A, m1 = self.transition_matrix, self.initial_loc
        noise = torch.randn(shape, dtype=m1.dtype, device=m1.device)
        first_tril, trils = self._transition_trils()
        first = m1 + ssm._mv(first_tril, noise[..., 0, :])
        if self.num_steps == 1:
            return first.unsqueeze(-2)
        steps = ssm._mv(trils, noise[..., 1:, :])  # (*S, *B, T-1, D)
        c = torch.cat([first.unsqueeze(-2), steps], dim=-2).movedim(-2, 0)
        E = A.expand(A.shape[:-3] + (self.num_steps - 1,) + A.shape[-2:]).movedim(-3, 0)
        E = E.reshape(E.shape[:1] + (1,) * (c.dim() - E.dim() + 1) + E.shape[1:])
        E = torch.cat([torch.zeros_like(E[:1]), E])
        return ssm._affine_recursion(E, c, self.method).movedim(0, -2)

    @property
    def mean(self) -> Tensor:
        A = self.transition_matrix
        means = [self.initial_loc.expand(self.batch_shape + (self.state_dim,))]
        for t in range(1, self.num_steps):
            means.append(ssm._mv(A[..., min(t - 1, A.shape[-3] - 1), :, :], means[-1]))
        return torch.stack(means, dim=-2)

    @property
    def variance(self) -> Tensor:
        """Marginal variances ``(..., T, D)``: the diagonals of ``P_1`` and
        ``P_t = A P_{t-1} A^T + Q``."""
        A, Q = self.transition_matrix, self.transition_cov
        covs = [self.initial_cov.expand(self.batch_shape + (self.state_dim,) * 2)]
        for t in range(1, self.num_steps):
            At = A[..., min(t - 1, A.shape[-3] - 1), :, :]
            covs.append(At @ covs[-1] @ At.mT + Q[..., min(t - 1, Q.shape[-3] - 1), :, :])
        return torch.stack(covs, dim=-3).diagonal(dim1=-2, dim2=-1)


class KalmanSmoothedPosterior(TorchDistribution):
    """``q(x) = p(x) prod_t N(y~_t | H_t x_t, V~_t) / Z``: a state-space prior times potentials.

    :param prior: the :class:`StateSpacePrior` p.
    :param observations: y~, ``(..., T, M)`` pseudo-observations (an encoder's output).
    :param observation_matrix: H, ``(M, D)`` or ``(..., T, M, D)``.
    :param observation_cov: V~, ``(M, M)`` or ``(..., T, M, M)``.
    :param mask: ``(..., T)`` bool, True where a potential is present (kept as
        ``observation_mask``; ``mask`` is the name of Pyro's masking method).

    Event shape ``(T, D)``; ``log_prob(x) = log p(x) + sum_t log N(y~_t | H_t x_t, V~_t) - log Z``
    (exact); ``rsample`` is reparameterised in every argument; ``mean`` and ``variance`` are the
    smoothed marginal means and variances; ``smoother`` holds all of
    :func:`pvae.ssm.kalman_smoother`'s results (``smoother.log_normalizer`` is log Z).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        prior: StateSpacePrior,
        observations: Tensor,
        observation_matrix: Tensor,
        observation_cov: Tensor,
        mask: Tensor | None = None,
        validate_args: bool | None = None,
    ):
        if not isinstance(prior, StateSpacePrior):
            raise TypeError(f"prior must be a StateSpacePrior, got {type(prior).__name__}")
        if observations.dim() < 2 or observations.shape[-2] != prior.num_steps:
            raise ValueError(
                f"observations must have shape (..., {prior.num_steps}, M), "
                f"got {tuple(observations.shape)}"
            )
        self.prior = prior
        self.observations = observations
        self.observation_matrix = _steps_first_shape(observation_matrix, "observation_matrix", 2)
        self.observation_cov = _steps_first_shape(observation_cov, "observation_cov", 2)
        self.observation_mask = mask
        self.smoother = ssm.kalman_smoother(
            observations,
            prior.transition_matrix,
            prior.transition_cov,
            self.observation_matrix,
            self.observation_cov,
            prior.initial_loc,
            prior.initial_cov,
            mask=mask,
            method=prior.method,
        )
        batch_shape = self.smoother.log_normalizer.shape
        super().__init__(batch_shape, prior.event_shape, validate_args=validate_args)

    @classmethod
    def from_diagonal_potentials(
        cls,
        prior: StateSpacePrior,
        loc: Tensor,
        scale: Tensor,
        mask: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> KalmanSmoothedPosterior:
        """Potentials ``N(loc_t | x_t, diag(scale_t^2))`` on the state (``H = I``);
        ``loc``, ``scale``: ``(..., T, D)``."""
        y, H, R = ssm.diagonal_potentials(loc, scale)
        return cls(prior, y, H, R, mask=mask, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(KalmanSmoothedPosterior, _instance)
        new.prior = self.prior.expand(batch_shape)
        new.observations = _expand_batch(self.observations, batch_shape, 2)
        new.observation_matrix = self.observation_matrix
        new.observation_cov = self.observation_cov
        new.observation_mask = (
            None
            if self.observation_mask is None
            else _expand_batch(self.observation_mask, batch_shape, 1)
        )
        fields = {}
        for name, value in vars(self.smoother).items():
            if isinstance(value, Tensor):
                trail = value.dim() - len(self.batch_shape)
                value = _expand_batch(value, batch_shape, trail)
            fields[name] = value
        new.smoother = ssm.KalmanSmootherResult(**fields)
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: _Shape = ()) -> Tensor:
        return self.smoother.rsample(torch.Size(sample_shape))

    def log_potentials(self, value: Tensor) -> Tensor:
        """``sum_t log N(y~_t | H_t x_t, V~_t)`` at the trajectory ``value``, shape ``(..)``."""
        y = self.observations
        if self.observation_mask is not None:
            y = torch.where(self.observation_mask.unsqueeze(-1), y, torch.zeros_like(y))
        residual = y - ssm._mv(self.observation_matrix, value)
        terms = ssm._gaussian_log_density(residual, torch.linalg.cholesky(self.observation_cov))
        if self.observation_mask is not None:
            terms = torch.where(self.observation_mask, terms, torch.zeros_like(terms))
        return terms.sum(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (
            self.prior.log_prob(value) + self.log_potentials(value) - self.smoother.log_normalizer
        )

    @property
    def mean(self) -> Tensor:
        return self.smoother.smoothed_means

    @property
    def variance(self) -> Tensor:
        return self.smoother.smoothed_covs.diagonal(dim1=-2, dim2=-1)

    def entropy(self) -> Tensor:
        """``H[q]``: the last marginal's entropy plus the backward conditionals'."""
        D = self.event_shape[-1]
        covs = torch.cat(
            [self.smoother.backward_covs, self.smoother.smoothed_covs[..., -1:, :, :]], dim=-3
        )
        log_det = 2 * ssm._psd_cholesky(covs).diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return 0.5 * (D * (1 + _LOG_2PI) + log_det).sum(-1)

    def expected_log_prior(self, prior: StateSpacePrior, detach: bool = False) -> Tensor:
        """``E_q[log p(x)]`` for any state-space prior p with the same T and D, shape ``(...)``.

        :param detach: hold q's smoothed moments fixed (no gradient through q, only through p).
        """
        s = self.smoother
        means, covs, cross = s.smoothed_means, s.smoothed_covs, s.smoothed_cross_covs
        if detach:
            means, covs, cross = means.detach(), covs.detach(), cross.detach()
        first = _expected_log_normal(
            means[..., 0, :] - prior.initial_loc,
            covs[..., 0, :, :],
            torch.linalg.cholesky(prior.initial_cov),
        )
        if self.event_shape[0] == 1:
            return first
        A = prior.transition_matrix
        residual = means[..., 1:, :] - ssm._mv(A, means[..., :-1, :])
        A_cross = A @ cross.mT  # A Cov(x_{t-1}, x_t)
        cov = covs[..., 1:, :, :] - A_cross - A_cross.mT + A @ covs[..., :-1, :, :] @ A.mT
        rest = _expected_log_normal(residual, cov, torch.linalg.cholesky(prior.transition_cov))
        return first + rest.sum(-1)


_PRIOR_FIELDS = ("transition_matrix", "transition_cov", "initial_loc", "initial_cov")


def same_state_space_prior(a: StateSpacePrior, b: StateSpacePrior) -> bool:
    """Whether two state-space priors have equal parameters (values, after broadcasting their
    batch dimensions), whether or not they are the same object.

    A model and its guide build the prior separately, as two objects with equal values; the
    KL below must recognise them as one prior to use its stable closed form.
    """
    if a is b:
        return True
    if a.num_steps != b.num_steps or a.event_shape != b.event_shape:
        return False
    for name in _PRIOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is y:
            continue
        try:
            x, y = torch.broadcast_tensors(x, y)
        except RuntimeError:
            return False
        if not torch.equal(x.detach(), y.detach()):
            return False
    return True


def _requires_grad(prior: StateSpacePrior) -> bool:
    return any(getattr(prior, name).requires_grad for name in _PRIOR_FIELDS)


@register_kl(KalmanSmoothedPosterior, StateSpacePrior)
def _kl_smoothed_posterior_prior(q: KalmanSmoothedPosterior, p: StateSpacePrior) -> Tensor:
    """``KL(q || p)``.

    When p has the parameters of q's own prior (equal values: the model and the guide build it
    as two objects) the value is the stable form ``sum_t E_q[log N(y~_t | H_t x_t, V~_t)] -
    log Z``, exact to rounding even where two time stamps nearly coincide; the general form
    ``-H[q] - E_q[log p(x)]`` subtracts O(1) terms there and loses up to 1e-2 nats.

    The stable form differentiates p's parameters along q's prior. When p is a separate
    object, the term ``E_q[log q.prior(x)] - E_q[log p(x)]`` (q's moments held fixed; value
    zero, subtracted out) moves that part of the gradient onto p's own tensors, so the
    gradient is right even when p is built from other tensors than q's prior.
    """
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"KL between trajectories of different shapes: {q.event_shape} and {p.event_shape}"
        )
    if not same_state_space_prior(q.prior, p):
        return -q.entropy() - q.expected_log_prior(p)
    stable = ssm.posterior_prior_kl(
        q.smoother, q.observations, q.observation_matrix, q.observation_cov, q.observation_mask
    )
    stable = stable.expand(torch.broadcast_shapes(stable.shape, p.batch_shape))
    if (
        q.prior is p
        or not torch.is_grad_enabled()
        or not (_requires_grad(p) or _requires_grad(q.prior))
    ):
        return stable
    moved = q.expected_log_prior(q.prior, detach=True) - q.expected_log_prior(p, detach=True)
    return stable + (moved - moved.detach())


class LinearGaussianEmission(TorchDistribution):
    """``p(y | x) = prod_{t observed} N(y_t | C x_t + d, R)``: a linear-Gaussian observation
    model of the trajectory ``x`` drawn at the latent site ``latent_site``.

    :param latent: the trajectory x, ``(..., T, D)`` (the value of the latent site).
    :param matrix: C, ``(M, D)``.
    :param bias: d, ``(M,)`` (or broadcastable to ``(..., T, M)``).
    :param cov: R, ``(M, M)`` positive definite.
    :param mask: ``(..., T)`` bool, True where ``y_t`` is observed (kept as
        ``observation_mask``); missing steps contribute nothing.
    :param latent_site: the name of the sample site whose value ``latent`` is, so that an
        engine can find its guide distribution.

    Event shape ``(T, M)``. ``log_prob(y)`` is the sum over observed steps; with a
    :class:`KalmanSmoothedPosterior` q of the latent site,
    ``expected_log_prob(q, y) = sum_t [log N(y_t | C m^s_t + d, R) - tr(R^{-1} C P^s_t C^T) / 2]``
    is ``E_q[log p(y | x)]`` exactly (:func:`pvae.ssm.expected_log_potentials` with
    pseudo-observations ``y - d``).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        latent: Tensor,
        matrix: Tensor,
        bias: Tensor,
        cov: Tensor,
        mask: Tensor | None = None,
        latent_site: str = "z",
        validate_args: bool | None = None,
    ):
        for name, value in (("latent", latent), ("matrix", matrix), ("bias", bias), ("cov", cov)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if latent.dim() < 2:
            raise ValueError(f"latent must have shape (..., T, D), got {tuple(latent.shape)}")
        D = latent.shape[-1]
        if matrix.dim() != 2 or matrix.shape[-1] != D:
            raise ValueError(f"matrix must have shape (M, {D}), got {tuple(matrix.shape)}")
        M = matrix.shape[0]
        if cov.shape != (M, M):
            raise ValueError(f"cov must have shape ({M}, {M}), got {tuple(cov.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape[-1] != latent.shape[-2]):
            raise ValueError(
                f"mask must be a bool tensor of shape (..., {latent.shape[-2]}), got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        self.latent = latent
        self.matrix = matrix
        self.bias = bias
        self.cov = cov
        self.observation_mask = mask
        self.latent_site = latent_site
        self.loc = ssm._mv(matrix, latent) + bias  # (..., T, M)
        batch_shape = self.loc.shape[:-2]
        if mask is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, mask.shape[:-1])
        super().__init__(batch_shape, self.loc.shape[-2:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(LinearGaussianEmission, _instance)
        new.latent = _expand_batch(self.latent, batch_shape, 2)
        new.matrix, new.bias, new.cov = self.matrix, self.bias, self.cov
        new.observation_mask = (
            None
            if self.observation_mask is None
            else _expand_batch(self.observation_mask, batch_shape, 1)
        )
        new.latent_site = self.latent_site
        new.loc = _expand_batch(self.loc, batch_shape, 2)
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _observed(self, terms: Tensor) -> Tensor:
        if self.observation_mask is not None:
            terms = torch.where(self.observation_mask, terms, torch.zeros_like(terms))
        return terms.sum(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        residual = value - self.loc
        if self.observation_mask is not None:  # hidden steps may hold anything, NaN included
            residual = torch.where(
                self.observation_mask.unsqueeze(-1), residual, torch.zeros_like(residual)
            )
        terms = ssm._gaussian_log_density(residual, torch.linalg.cholesky(self.cov))
        return self._observed(terms)

    def rsample(self, sample_shape: _Shape = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc.expand(shape) + ssm._mv(torch.linalg.cholesky(self.cov), noise)

    @property
    def mean(self) -> Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    def expected_log_prob(self, q: KalmanSmoothedPosterior, value: Tensor) -> Tensor:
        """``E_q[log p(value | x)]`` in closed form, shape ``broadcast(q.batch_shape,
        self.batch_shape)``; q is the smoothed posterior of the latent trajectory."""
        if not isinstance(q, KalmanSmoothedPosterior):
            raise TypeError(
                f"expected_log_prob needs a KalmanSmoothedPosterior, got {type(q).__name__}"
            )
        if q.event_shape != self.latent.shape[-2:]:
            raise ValueError(
                f"q has event shape {tuple(q.event_shape)}, the latent trajectory "
                f"{tuple(self.latent.shape[-2:])}"
            )
        y = value - self.bias
        mask = self.observation_mask
        if mask is not None:
            y = torch.where(mask.unsqueeze(-1), y, torch.zeros_like(y))
        return ssm.expected_log_potentials(q.smoother, y, self.matrix, self.cov, mask)


class MarkovianPrior(nn.Module):
    """Independent GPs per channel as a linear state-space model in the time domain.

    Each channel is a stationary Ornstein-Uhlenbeck process (Matérn-1/2 kernel
    ``exp(-|tau| / l)``, unit variance): ``z_t = a z_{t-1} + q_t``, ``a = exp(-dt / l)``,
    ``q_t ~ N(0, 1 - a^2)``, ``z_1 ~ N(0, 1)``. The site's value is the state trajectory
    ``(..., B, T, D)``; the guide is the Kalman-smoothed prior times the potentials
    (:class:`pvae.distributions.KalmanSmoothedPosterior`, exact KL against the prior).

    Extension point: a higher-order Matérn SDE (state of ``order`` components per channel)
    plugs in by overriding :meth:`state_space` to return its ``(A, Q, P_1, H)`` with
    ``H (C, D)`` picking each channel's path out of the state; nothing else changes.

    :param num_channels: number of latent paths C.
    :param lengthscale: initial lengthscale (time units), learned per channel.
    """

    def __init__(self, num_channels: int, lengthscale: float = 5.0) -> None:
        super().__init__()
        self.num_channels = _positive_int(num_channels, "num_channels")
        lengthscale = _positive_float(lengthscale, "lengthscale")
        self.log_lengthscale = nn.Parameter(torch.full((self.num_channels,), math.log(lengthscale)))

    def state_space(self, dt: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A (D, D), Q (D, D), P_1 (D, D), H (C, D))`` of the state-space form, D = C."""
        decay = torch.exp(-dt / self.log_lengthscale.exp())
        eye = torch.eye(self.num_channels, dtype=decay.dtype, device=decay.device)
        return torch.diag_embed(decay), torch.diag_embed(1 - decay**2), eye, eye

    def prior(self, batch: int, num_steps: int, dt: float) -> StateSpacePrior:
        A, Q, P1, _ = self.state_space(dt)
        initial_loc = A.new_zeros(batch, A.shape[-1])
        return StateSpacePrior(A, Q, initial_loc, P1, num_steps)

    def posterior(self, loc: Tensor, precision: Tensor, dt: float) -> KalmanSmoothedPosterior:
        _, _, _, H = self.state_space(dt)
        prior = self.prior(loc.shape[0], loc.shape[-2], dt)
        covariance = torch.diag_embed(precision.clamp_min(_NO_PRECISION).reciprocal())
        return KalmanSmoothedPosterior(prior, loc, H, covariance)

    def paths(self, value: Tensor, num_steps: int, dt: float) -> Tensor:
        _, _, _, H = self.state_space(dt)
        return value @ H.mT

    def path_moments(
        self, posterior: dist.TorchDistribution, num_steps: int, dt: float
    ) -> tuple[Tensor, Tensor]:
        _, _, _, H = self.state_space(dt)
        assert isinstance(posterior, KalmanSmoothedPosterior)
        covariance = H @ posterior.smoother.smoothed_covs @ H.mT
        return posterior.mean @ H.mT, covariance.diagonal(dim1=-2, dim2=-1)

"""Gaussians over time with a banded (tridiagonal) precision: the GP-VAE's guide.

:class:`BandedGaussian` is ``N(loc, (B B^T)^{-1})`` with ``B`` upper bidiagonal (Fortuin et
al. 2020); :func:`bidiagonal_solve` is its O(T) triangular solve (log-depth scan).
``kl_divergence(BandedGaussian, MultivariateNormal)`` is registered in closed form, so the ELBO
engine uses it against a dense GP prior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import MultivariateNormal, constraints, register_kl

__all__ = ["BandedGaussian", "bidiagonal_solve"]

_LOG_2PI = math.log(2 * math.pi)


def _linear_recurrence(coefficient: Tensor, offset: Tensor) -> Tensor:
    """``x_0 = b_0``, ``x_i = a_i x_{i-1} + b_i`` along the last dimension, in ``ceil(log2 T)``
    vectorised steps (a Hillis-Steele scan of the affine maps ``x -> a_i x + b_i``).

    :param coefficient: ``a``, broadcastable to ``offset``'s shape; ``a_0`` is ignored.
    :param offset: ``b``, ``(..., T)``.
    """
    T = offset.shape[-1]
    a = coefficient.expand(offset.shape)
    a = torch.cat([torch.zeros_like(a[..., :1]), a[..., 1:]], -1)
    b = offset
    step = 1
    while step < T:
        b = torch.cat([b[..., :step], b[..., step:] + a[..., step:] * b[..., :-step]], -1)
        a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], -1)
        step *= 2
    return b


def bidiagonal_solve(
    diagonal: Tensor, superdiagonal: Tensor, rhs: Tensor, transpose: bool = False
) -> Tensor:
    """Solve ``B x = y`` (or ``B^T x = y`` when ``transpose``) for the upper-bidiagonal
    ``B`` with ``B_ii = diagonal_i`` and ``B_{i,i+1} = superdiagonal_i``, along the last
    dimension.

    :param diagonal: ``(..., T)``, non-zero.
    :param superdiagonal: ``(..., T - 1)``.
    :param rhs: ``(..., T)``; extra leading dimensions broadcast (e.g. ``(..., K, T)`` with
        ``diagonal[..., None, :]`` solves K right-hand sides at once).
    """
    if transpose:  # x_i = (y_i - s_{i-1} x_{i-1}) / d_i
        coefficient = -F.pad(superdiagonal, (1, 0)) / diagonal
        return _linear_recurrence(coefficient, rhs / diagonal)
    # x_i = (y_i - s_i x_{i+1}) / d_i: the same recurrence run backwards
    flip_d, flip_y = diagonal.flip(-1), rhs.flip(-1)
    coefficient = -F.pad(superdiagonal.flip(-1), (1, 0)) / flip_d
    return _linear_recurrence(coefficient, flip_y / flip_d).flip(-1)


class BandedGaussian(TorchDistribution):
    """``N(loc, (B B^T)^{-1})`` over ``(T,)`` with ``B`` upper bidiagonal: the precision
    ``Lambda = B B^T`` is tridiagonal (Fortuin et al. 2020, the GP-VAE's guide).

    :param loc: m, ``(..., T)``.
    :param diagonal: ``B_ii > 0``, ``(..., T)``.
    :param superdiagonal: ``B_{i,i+1}``, ``(..., T - 1)`` (any real).

    ``rsample``: ``z = m + B^{-T} eps`` (one banded triangular solve, O(T log T) work in
    log-depth). ``log_prob(z) = sum_i log B_ii - ||B^T (z - m)||^2 / 2 - T log(2 pi) / 2``;
    ``entropy = T (1 + log 2 pi) / 2 - sum_i log B_ii``. Batch shape ``(...)``, event ``(T,)``.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "diagonal": constraints.independent(constraints.positive, 1),
        "superdiagonal": constraints.real_vector,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        diagonal: Tensor,
        superdiagonal: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if loc.dim() < 1:
            raise ValueError("loc must have at least one dimension (..., T)")
        T = loc.shape[-1]
        if superdiagonal.shape[-1] != T - 1:
            raise ValueError(
                f"superdiagonal must have T - 1 = {T - 1} entries, got {superdiagonal.shape[-1]}"
            )
        batch_shape = torch.broadcast_shapes(
            loc.shape[:-1], diagonal.shape[:-1], superdiagonal.shape[:-1]
        )
        self.loc = loc.expand(*batch_shape, T)
        self.diagonal = diagonal.expand(*batch_shape, T)
        self.superdiagonal = superdiagonal.expand(*batch_shape, T - 1)
        super().__init__(batch_shape, torch.Size([T]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        T = self.event_shape[0]
        return BandedGaussian(
            self.loc.expand(*batch_shape, T),
            self.diagonal.expand(*batch_shape, T),
            self.superdiagonal.expand(*batch_shape, T - 1),
        )

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def precision_matrix(self) -> Tensor:
        """``B B^T``, dense ``(..., T, T)``."""
        return self.bidiagonal @ self.bidiagonal.mT

    @property
    def bidiagonal(self) -> Tensor:
        """``B``, dense ``(..., T, T)``."""
        return torch.diag_embed(self.diagonal) + torch.diag_embed(self.superdiagonal, 1)

    def _inverse_transpose_rows(self) -> Tensor:
        """``(B^{-T})^T = B^{-1}``, dense ``(..., T, T)`` (row k is ``B^{-T} e_k``)."""
        T = self.event_shape[0]
        eye = torch.eye(T, dtype=self.loc.dtype, device=self.loc.device)
        return bidiagonal_solve(
            self.diagonal[..., None, :], self.superdiagonal[..., None, :], eye, transpose=True
        )

    @property
    def covariance_matrix(self) -> Tensor:
        """``(B B^T)^{-1} = B^{-T} B^{-1}``, dense ``(..., T, T)``."""
        inverse = self._inverse_transpose_rows()  # = B^{-1}
        return inverse.mT @ inverse

    @property
    def variance(self) -> Tensor:
        return self._inverse_transpose_rows().pow(2).sum(-2)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + bidiagonal_solve(self.diagonal, self.superdiagonal, eps, transpose=True)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        r = value - self.loc
        u = self.diagonal * r + F.pad(self.superdiagonal * r[..., :-1], (1, 0))  # B^T r
        T = self.event_shape[0]
        return self.diagonal.log().sum(-1) - 0.5 * u.pow(2).sum(-1) - 0.5 * T * _LOG_2PI

    def entropy(self) -> Tensor:
        T = self.event_shape[0]
        return 0.5 * T * (1 + _LOG_2PI) - self.diagonal.log().sum(-1)


@register_kl(BandedGaussian, MultivariateNormal)
def _kl_banded_gaussian_mvn(q: BandedGaussian, p: MultivariateNormal) -> Tensor:
    """``KL(N(m, S) || N(mu, K))``, ``S = (B B^T)^{-1}``, ``K = L L^T``::

        (tr(K^{-1} S) + (m - mu)^T K^{-1} (m - mu) - T + log|K| - log|S|) / 2

    with ``tr(K^{-1} S) = ||B^{-1} L^{-T}||_F^2`` (a banded solve of ``L^{-T}``),
    ``log|S| = -2 sum log B_ii``. ``L^{-1}`` is computed once per distinct prior covariance
    (e.g. once per sequence, shared by the channels)."""
    if q.event_shape != p.event_shape:
        raise ValueError(f"KL between shapes {q.event_shape} and {p.event_shape}")
    T = q.event_shape[0]
    scale_tril = p._unbroadcasted_scale_tril
    eye = torch.eye(T, dtype=scale_tril.dtype, device=scale_tril.device)
    tril_inverse = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L^{-1}
    # rows of L^{-1} are the columns of L^{-T}: solve B X = L^{-T} column by column
    solved = bidiagonal_solve(
        q.diagonal[..., None, :], q.superdiagonal[..., None, :], tril_inverse, transpose=False
    )
    trace = solved.pow(2).sum((-2, -1))
    whitened = _whiten(scale_tril, q.loc - p.loc)
    mahalanobis = whitened.pow(2).sum((-2, -1))
    log_det_prior = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - T + log_det_prior) + q.diagonal.log().sum(-1)


def _whiten(scale_tril: Tensor, difference: Tensor) -> Tensor:
    """``L^{-1} d`` as ``(..., T, 1)`` with ``L`` broadcast against ``d (..., T)``."""
    shape = torch.broadcast_shapes(scale_tril.shape[:-2], difference.shape[:-1])
    T = difference.shape[-1]
    return torch.linalg.solve_triangular(
        scale_tril.expand(*shape, T, T), difference.expand(*shape, T)[..., None], upper=False
    )

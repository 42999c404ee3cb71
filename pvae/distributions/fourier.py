"""Independent RBF Gaussian processes per channel in the Fourier domain (Gondur et al. 2024).

A path on ``T`` evenly spaced steps (``dt`` apart), padded to ``T'`` steps, is expanded in the
real orthonormal Fourier basis of ``T'`` points (:func:`fourier_basis`); the coefficients are
independent with variances ``S(w_k) / dt`` (:func:`rbf_spectral_density`), truncated above a
cut-off frequency. :class:`FourierRBFPrior` builds that prior and the Gaussian posterior under
per-step Gaussian potentials.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ._checks import positive_float as _positive_float
from ._checks import positive_int as _positive_int

__all__ = ["FourierRBFPrior", "fourier_basis", "rbf_spectral_density"]

_TRUNCATION = 1e-8  # S(w_max) / S(0) for the shortest current lengthscale


def rbf_spectral_density(frequency: Tensor, lengthscale: Tensor, variance: float = 1.0) -> Tensor:
    """``S(w) = s^2 sqrt(2 pi) l exp(-2 pi^2 l^2 w^2)``, the Fourier transform of the RBF kernel
    ``s^2 exp(-tau^2 / (2 l^2))`` with w in cycles per time unit; shapes broadcast."""
    return (
        variance
        * math.sqrt(2 * math.pi)
        * lengthscale
        * torch.exp(-2 * (math.pi * lengthscale * frequency) ** 2)
    )


def fourier_basis(
    num_steps: int, padded_steps: int, max_index: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """The real orthonormal Fourier basis of ``padded_steps`` points, first ``num_steps`` rows.

    :returns: ``(basis (num_steps, K), index (K,))``: the columns are, for frequency index
        ``k = 0 .. max_index`` (at most ``padded_steps // 2``): ``1 / sqrt(T')`` (k = 0),
        ``sqrt(2 / T') cos(2 pi k t / T')`` and ``sqrt(2 / T') sin(2 pi k t / T')``
        (``0 < k < T' / 2``), ``cos(pi t) / sqrt(T')`` (k = T' / 2); ``index`` holds each
        column's k. On all ``T'`` rows with ``max_index = T' // 2`` the basis is orthogonal.
    """
    _positive_int(num_steps, "num_steps")
    _positive_int(padded_steps, "padded_steps", num_steps)
    max_index = min(int(max_index), padded_steps // 2)
    t = torch.arange(num_steps, dtype=torch.float64)
    columns, index = [torch.full((num_steps,), padded_steps**-0.5, dtype=torch.float64)], [0]
    for k in range(1, max_index + 1):
        phase = 2 * math.pi * k * t / padded_steps
        if 2 * k == padded_steps:
            columns.append(torch.cos(phase) * padded_steps**-0.5)
            index.append(k)
        else:
            columns += [torch.cos(phase) * (2 / padded_steps) ** 0.5]
            columns += [torch.sin(phase) * (2 / padded_steps) ** 0.5]
            index += [k, k]
    return torch.stack(columns, -1).to(dtype), torch.tensor(index, dtype=dtype)


class FourierRBFPrior(nn.Module):
    """Independent RBF GPs per channel in the Fourier domain (see the module docstring).

    :param num_channels: number of latent paths C.
    :param lengthscale: initial lengthscale (time units) of every channel, learned.
    :param padding: padding of the trial, in time units. Default None: ``4 * lengthscale`` of
        the longest current lengthscale (wrap-around error below ``exp(-8)`` of the variance),
        recomputed whenever the lengthscales move. A number fixes it (the prior then drifts
        from the RBF once a lengthscale grows past ``padding / 4``).
    :param max_frequency: highest frequency kept (cycles per time unit). Default None: where
        ``S(w) / S(0) = 1e-8`` for the shortest current lengthscale, recomputed like the
        padding. A number fixes it.
    :param learn_lengthscale: whether the lengthscales are parameters.

    The site's value: coefficients ``(..., B, C, K)``; the guide is one ``K``-variate Gaussian
    per trial and channel (``MultivariateNormal(...).to_event(1)``), the prior a diagonal one,
    so the KL is analytic. With the default padding and cut-off, ``K`` follows the current
    lengthscales (the model and the guide of one step read the same ones), so the covariance
    ``B diag(lambda) B^T`` stays the RBF kernel of the lengthscale the model reports, whatever
    value it learns.
    """

    def __init__(
        self,
        num_channels: int,
        lengthscale: float = 5.0,
        padding: float | None = None,
        max_frequency: float | None = None,
        learn_lengthscale: bool = True,
    ) -> None:
        super().__init__()
        self.num_channels = _positive_int(num_channels, "num_channels")
        lengthscale = _positive_float(lengthscale, "lengthscale")
        if padding is not None and not (
            isinstance(padding, int | float) and math.isfinite(padding) and padding >= 0
        ):
            raise ValueError(f"padding must be a number >= 0 or None, got {padding!r}")
        self.fixed_padding = None if padding is None else float(padding)
        self.fixed_max_frequency = (
            None if max_frequency is None else _positive_float(max_frequency, "max_frequency")
        )
        log_lengthscale = torch.full((self.num_channels,), math.log(lengthscale))
        if learn_lengthscale:
            self.log_lengthscale = nn.Parameter(log_lengthscale)
        else:
            self.register_buffer("log_lengthscale", log_lengthscale)

    @property
    def lengthscale(self) -> Tensor:
        """``(C,)`` lengthscales in time units."""
        return self.log_lengthscale.exp()

    def _lengthscale_range(self) -> tuple[float, float]:
        values = self.log_lengthscale.detach().exp()
        shortest, longest = float(values.min()), float(values.max())
        if not (math.isfinite(shortest) and math.isfinite(longest) and shortest > 0):
            raise ValueError(
                f"FourierRBFPrior: lengthscales must be finite and positive, got {values.tolist()}"
            )
        return shortest, longest

    @property
    def padding(self) -> float:
        """Padding in time units: the fixed value, or ``4 *`` the longest lengthscale."""
        if self.fixed_padding is not None:
            return self.fixed_padding
        return 4 * self._lengthscale_range()[1]

    @property
    def max_frequency(self) -> float:
        """Cut-off in cycles per time unit: the fixed value, or where ``S(w) / S(0) = 1e-8``
        for the shortest lengthscale."""
        if self.fixed_max_frequency is not None:
            return self.fixed_max_frequency
        shortest = self._lengthscale_range()[0]
        return math.sqrt(math.log(1 / _TRUNCATION) / 2) / (math.pi * shortest)

    def padded_steps(self, num_steps: int, dt: float) -> int:
        """``T' = T + ceil(padding / dt)``."""
        return num_steps + math.ceil(self.padding / dt - 1e-9)

    def basis(self, num_steps: int, dt: float) -> tuple[Tensor, Tensor]:
        """``(B (T, K), lambda (C, K))``: the truncated basis and each coefficient's prior
        variance ``S(w_k) / dt``, floored at ``1e-8 S(0) / dt`` per channel."""
        padded = self.padded_steps(num_steps, dt)
        max_index = math.floor(self.max_frequency * padded * dt + 1e-9)
        ref = self.log_lengthscale
        basis, index = fourier_basis(num_steps, padded, max_index, dtype=ref.dtype)
        basis, index = basis.to(ref.device), index.to(ref.device)
        frequency = index / (padded * dt)
        lengthscale = self.lengthscale[:, None]
        variance = rbf_spectral_density(frequency, lengthscale) / dt
        # the cut-off serves the shortest lengthscale; a longer one's high frequencies would get
        # variances far below 1e-8 of its S(0) (1e-22 at 1.6x): floored there, its precision
        # stays conditioned as at the cut-off, and the covariance moves by < 1e-7 of s^2
        floor = _TRUNCATION * rbf_spectral_density(frequency.new_zeros(()), lengthscale) / dt
        return basis, torch.maximum(variance, floor)

    def prior(self, batch: int, num_steps: int, dt: float) -> dist.TorchDistribution:
        _, variance = self.basis(num_steps, dt)
        scale_tril = torch.diag_embed(variance.sqrt())
        mvn = dist.MultivariateNormal(torch.zeros_like(variance), scale_tril=scale_tril)
        return mvn.expand(torch.Size([batch, self.num_channels])).to_event(1)

    def posterior(self, loc: Tensor, precision: Tensor, dt: float) -> dist.TorchDistribution:
        basis, variance = self.basis(loc.shape[-2], dt)
        # P = diag(1 / lambda) + B^T diag(precision) B per trial and channel: (B, C, K, K)
        weighted = precision.mT[..., :, :, None] * basis  # (B, C, T, K)
        matrix = basis.mT @ weighted + torch.diag_embed(variance.reciprocal())
        linear = (weighted * loc.mT[..., None]).sum(-2)  # B^T (precision * loc): (B, C, K)
        cholesky = torch.linalg.cholesky(matrix)
        mean = torch.cholesky_solve(linear[..., None], cholesky)[..., 0]
        scale_tril = _precision_cholesky_to_scale_tril(cholesky)
        return dist.MultivariateNormal(mean, scale_tril=scale_tril).to_event(1)

    def paths(self, value: Tensor, num_steps: int, dt: float) -> Tensor:
        basis, _ = self.basis(num_steps, dt)
        return (value @ basis.mT).mT

    def path_moments(
        self, posterior: dist.TorchDistribution, num_steps: int, dt: float
    ) -> tuple[Tensor, Tensor]:
        mvn = posterior.base_dist  # type: ignore[attr-defined]
        basis, _ = self.basis(num_steps, dt)
        mean = (mvn.loc @ basis.mT).mT
        variance = (basis @ mvn.scale_tril).pow(2).sum(-1).mT
        return mean, variance

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, padding={self.padding:g}, "
            f"max_frequency={self.max_frequency:g}"
        )


def _precision_cholesky_to_scale_tril(cholesky: Tensor) -> Tensor:
    """The lower Cholesky factor of ``P^-1`` from the Cholesky factor ``L`` of ``P``."""
    return torch.linalg.cholesky(torch.cholesky_inverse(cholesky))

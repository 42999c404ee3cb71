"""What a GP prior over latent paths offers the multimodal GP-VAE: one interface, two
parameterisations (:class:`pvae.distributions.fourier.FourierRBFPrior` in the Fourier domain,
:class:`pvae.distributions.state_space.MarkovianPrior` in the time domain)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyro.distributions as dist
from torch import Tensor

__all__ = ["TemporalPrior"]


@runtime_checkable
class TemporalPrior(Protocol):
    """What :class:`pvae.models.MultimodalGPVAE` needs of a GP prior over ``num_channels``
    latent paths.

    The latent site's value may be any representation (Fourier coefficients, a state-space
    trajectory); ``paths`` turns it into the paths ``(..., B, T, num_channels)``.

    - ``prior(batch, num_steps, dt)``: the prior distribution of the site, batch shape
      ``(batch,)``.
    - ``posterior(loc, precision, dt)``: the prior times Gaussian potentials
      ``N(loc_t | z_t, diag(1 / precision_t))`` (``(B, T, C)``; precision 0 = no potential),
      normalised; batch shape ``(B,)``, the same event shape as ``prior``.
    - ``paths(value, num_steps, dt)``: ``(..., B, T, C)`` from a value of the site.
    - ``path_moments(posterior, num_steps, dt)``: the marginal means and variances of the paths
      under ``posterior``, each ``(B, T, C)``; channels are independent under the posterior.
    """

    num_channels: int

    def prior(self, batch: int, num_steps: int, dt: float) -> dist.TorchDistribution: ...

    def posterior(self, loc: Tensor, precision: Tensor, dt: float) -> dist.TorchDistribution: ...

    def paths(self, value: Tensor, num_steps: int, dt: float) -> Tensor: ...

    def path_moments(
        self, posterior: dist.TorchDistribution, num_steps: int, dt: float
    ) -> tuple[Tensor, Tensor]: ...

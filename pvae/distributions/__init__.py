"""Pyro distributions of pvae, grouped by kind (each module documents its own):

- :mod:`pvae.distributions.state_space`: linear-Gaussian state-space paths --
  :class:`StateSpacePrior`, :class:`KalmanSmoothedPosterior` (closed-form KL registered),
  :class:`LinearGaussianEmission`, and :class:`MarkovianPrior` (OU GPs per channel);
- :mod:`pvae.distributions.banded`: :class:`BandedGaussian`, a Gaussian over time with a
  tridiagonal precision (closed-form KL to a dense ``MultivariateNormal`` registered);
- :mod:`pvae.distributions.sequential`: :class:`SequentialPrior`, a GRU-driven autoregressive
  prior over paths;
- :mod:`pvae.distributions.fourier`: :class:`FourierRBFPrior`, RBF GPs in the Fourier domain;
- :mod:`pvae.distributions.mixture`: :class:`StratifiedMixture`, equal-weight Gaussian
  mixtures with stratified draws;
- :mod:`pvae.distributions.temporal`: :class:`TemporalPrior`, the interface the Fourier and
  Markovian priors share.

Every name is importable from ``pvae.distributions`` itself; importing the package registers
the closed-form KL divergences.
"""

from .banded import BandedGaussian, bidiagonal_solve
from .fourier import FourierRBFPrior, fourier_basis, rbf_spectral_density
from .mixture import StratifiedMixture
from .sequential import PriorNet, SequentialPrior
from .state_space import (
    KalmanSmoothedPosterior,
    LinearGaussianEmission,
    MarkovianPrior,
    StateSpacePrior,
    same_state_space_prior,
)
from .temporal import TemporalPrior

__all__ = [
    "BandedGaussian",
    "FourierRBFPrior",
    "KalmanSmoothedPosterior",
    "LinearGaussianEmission",
    "MarkovianPrior",
    "PriorNet",
    "SequentialPrior",
    "StateSpacePrior",
    "StratifiedMixture",
    "TemporalPrior",
    "bidiagonal_solve",
    "fourier_basis",
    "rbf_spectral_density",
    "same_state_space_prior",
]

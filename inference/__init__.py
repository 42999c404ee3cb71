"""Inference engines (installed as ``pvae.inference``).

Every variational engine is a ``pyro.infer.ELBO`` subclass: use it in ``pyro.infer.SVI`` or in
``pvae.fit``. Each reports the bound itself, never a surrogate. ``SGHMC`` is a sampler engine,
their sibling: use it through ``pvae.sample``.
"""

from .base import Engine, SplitLoss
from .elbo import ELBO, CyclicalAnnealing, LinearAnnealing
from .importance import CIWAE, IWAE, MIWAE, PIWAE
from .kalman import KalmanELBO
from .sghmc import SGHMC

__all__ = [
    "CIWAE",
    "ELBO",
    "IWAE",
    "MIWAE",
    "PIWAE",
    "SGHMC",
    "KalmanELBO",
    "CyclicalAnnealing",
    "Engine",
    "LinearAnnealing",
    "SplitLoss",
]

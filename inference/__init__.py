"""Inference engines (installed as ``pvae.inference``).

Every variational engine is a ``pyro.infer.ELBO`` subclass: use it in ``pyro.infer.SVI`` or in
``pvae.fit``. Each reports the bound itself, never a surrogate. ``SGHMC`` is a sampler engine,
their sibling (a :class:`SamplerEngine`, the contract ``pvae.sample`` takes): use it through
``pvae.sample``. ``ESTIMATORS`` names every estimator of the guide's gradient; each engine
class lists those it accepts in ``estimators``.
"""

from pvae.steps import SamplerEngine, StepEngine

from .base import ESTIMATORS, Engine, SplitLoss
from .elbo import ELBO, CyclicalAnnealing, LinearAnnealing
from .importance import CIWAE, IWAE, MIWAE, PIWAE
from .kalman import KalmanELBO
from .sghmc import SGHMC

__all__ = [
    "ESTIMATORS",
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
    "SamplerEngine",
    "SplitLoss",
    "StepEngine",
]

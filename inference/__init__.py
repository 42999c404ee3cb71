"""Inference engines (installed as ``pvae.inference``).

Every variational engine is a ``pyro.infer.ELBO`` subclass: use it in ``pyro.infer.SVI`` or in
``pvae.fit``. Each reports the bound itself, never a surrogate.
"""

from .base import Engine
from .elbo import ELBO, CyclicalAnnealing, LinearAnnealing

__all__ = ["Engine", "ELBO", "LinearAnnealing", "CyclicalAnnealing"]

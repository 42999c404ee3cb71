"""The variational engines every test trains with, at small particle budgets: one list, so that
an engine added to :mod:`pvae.inference` is added here once and reaches every test that
parametrises over ``ENGINES`` (the contract suite, the protocol, the reliability checks).

``ENGINES[name](estimator="reparam", vectorize_particles=True)`` builds a fresh engine:
ELBO (one particle, analytic KL where registered), IWAE_4, MIWAE(2, 2), CIWAE_4 with
beta = 0.5 and PIWAE(2, 2). ``STATE_SPACE_ENGINES`` holds the engine of pairs whose guide draws a
:class:`pvae.distributions.KalmanSmoothedPosterior`.

Imported as ``from engine_cases import ENGINES`` (``tests/`` is on ``sys.path`` through its
``conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro

from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE, KalmanELBO

__all__ = ["ENGINES", "ESTIMATORS", "STATE_SPACE_ENGINES", "EngineFactory"]

EngineFactory = Callable[..., pyro.infer.ELBO]

ESTIMATORS = ("reparam", "stl", "dreg")
"""Gradient estimators the multi-particle engines take (ELBO takes reparam and stl)."""


def _elbo(estimator: str = "reparam", vectorize_particles: bool = True) -> pyro.infer.ELBO:
    return ELBO(estimator=estimator, vectorize_particles=vectorize_particles)


def _iwae(estimator: str = "reparam", vectorize_particles: bool = True) -> pyro.infer.ELBO:
    return IWAE(4, estimator=estimator, vectorize_particles=vectorize_particles)


def _miwae(estimator: str = "reparam", vectorize_particles: bool = True) -> pyro.infer.ELBO:
    return MIWAE(2, 2, estimator=estimator, vectorize_particles=vectorize_particles)


def _ciwae(estimator: str = "reparam", vectorize_particles: bool = True) -> pyro.infer.ELBO:
    return CIWAE(4, beta=0.5, estimator=estimator, vectorize_particles=vectorize_particles)


def _piwae(estimator: str = "reparam", vectorize_particles: bool = True) -> pyro.infer.ELBO:
    return PIWAE(2, 2, estimator=estimator, vectorize_particles=vectorize_particles)


ENGINES: dict[str, EngineFactory] = {
    "ELBO": _elbo,
    "IWAE": _iwae,
    "MIWAE": _miwae,
    "CIWAE": _ciwae,
    "PIWAE": _piwae,
}

STATE_SPACE_ENGINES: dict[str, EngineFactory] = {
    "KalmanELBO": lambda estimator="reparam", vectorize_particles=True: KalmanELBO(
        vectorize_particles=vectorize_particles
    ),
}

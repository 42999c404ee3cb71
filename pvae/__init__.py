"""pvae: probabilistic-programming VAEs on Pyro.

Write a model/guide pair in Pyro (per-datapoint sites inside ``pyro.plate("data")``), train it
with any engine of :mod:`pvae.inference` through :func:`fit`, and evaluate it with
:func:`log_likelihood`; sample a model's latents with a sampler engine through :func:`sample`.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below load on first use (__getattr__)
    from pvae import data, likelihoods, nets
    from pvae.evaluate import log_likelihood
    from pvae.protocol import VectorizationError, scale_to_data
    from pvae.sampling import Posterior, SamplingDiverged, SamplingInterrupted, sample
    from pvae.steps import SamplerEngine
    from pvae.train import (
        AggressiveEncoder,
        Run,
        StepContext,
        StepPolicy,
        TrainingDiverged,
        check_fit,
        evaluate_bound,
        fit,
        load_checkpoint,
    )

__version__ = "0.1.0"


_LAZY = {  # name -> module: imported on first use, so that `import pvae` (and `pvae --help`)
    # imports neither torch nor Pyro
    "log_likelihood": "pvae.evaluate",
    "VectorizationError": "pvae.protocol",
    "scale_to_data": "pvae.protocol",
    "Posterior": "pvae.sampling",
    "SamplingDiverged": "pvae.sampling",
    "SamplingInterrupted": "pvae.sampling",
    "sample": "pvae.sampling",
    "SamplerEngine": "pvae.steps",
    "AggressiveEncoder": "pvae.train",
    "StepContext": "pvae.train",
    "StepPolicy": "pvae.train",
    "Run": "pvae.train",
    "TrainingDiverged": "pvae.train",
    "check_fit": "pvae.train",
    "evaluate_bound": "pvae.train",
    "fit": "pvae.train",
    "load_checkpoint": "pvae.train",
}
_SUBMODULES = ("data", "likelihoods", "nets", "models", "inference", "diagnostics", "app", "plots")


def __getattr__(name: str):
    """Every public name loads on first use: the submodules (``pvae.models`` and
    ``pvae.inference`` import core, not the other way round) and the functions above, so
    ``import pvae; pvae.fit(...)`` and ``pvae.inference.ELBO()`` work."""
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"pvae.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "AggressiveEncoder",
    "Posterior",
    "Run",
    "SamplerEngine",
    "StepContext",
    "StepPolicy",
    "SamplingDiverged",
    "SamplingInterrupted",
    "TrainingDiverged",
    "VectorizationError",
    "check_fit",
    "data",
    "evaluate_bound",
    "fit",
    "likelihoods",
    "load_checkpoint",
    "log_likelihood",
    "nets",
    "sample",
    "scale_to_data",
]

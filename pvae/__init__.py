"""pvae: probabilistic-programming VAEs on Pyro.

Write a model/guide pair in Pyro (per-datapoint sites inside ``pyro.plate("data")``), train it
with any engine of :mod:`pvae.inference` through :func:`fit`, and evaluate it with
:func:`log_likelihood`; sample a model's latents with a sampler engine through :func:`sample`.
"""

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


def __getattr__(name: str):
    """``pvae.models`` and ``pvae.inference`` load on first use (they import core, not the
    other way round), so ``import pvae; pvae.inference.ELBO()`` works."""
    if name in ("models", "inference", "diagnostics", "app", "plots"):
        import importlib

        return importlib.import_module(f"pvae.{name}")
    raise AttributeError(f"module 'pvae' has no attribute {name!r}")


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

"""pvae: probabilistic-programming VAEs on Pyro.

Write a model/guide pair in Pyro (per-datapoint sites inside ``pyro.plate("data")``), train it
with any engine of :mod:`pvae.inference` through :func:`fit`, and evaluate it with
:func:`log_likelihood`.
"""

from pvae import data, likelihoods, nets
from pvae.evaluate import log_likelihood
from pvae.protocol import VectorizationError, scale_to_data
from pvae.train import Run, TrainingDiverged, evaluate_bound, fit, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Run",
    "TrainingDiverged",
    "VectorizationError",
    "data",
    "evaluate_bound",
    "fit",
    "likelihoods",
    "load_checkpoint",
    "log_likelihood",
    "nets",
    "scale_to_data",
]

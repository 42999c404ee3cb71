"""Diagnostics that work on any model/guide pair.

- :func:`log_likelihood`: the shared importance-sampled estimator (also ``pvae.log_likelihood``).
- :func:`gradient_snr`: the gradient signal-to-noise ratio of Rainforth et al. (2018).
"""

from pvae.diagnostics.snr import GradientSNR, gradient_snr
from pvae.evaluate import log_likelihood

__all__ = ["GradientSNR", "gradient_snr", "log_likelihood"]

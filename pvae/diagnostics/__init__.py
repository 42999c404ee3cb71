"""Diagnostics that work on any model/guide pair.

- :func:`log_likelihood`: the shared importance-sampled estimator (also ``pvae.log_likelihood``).
- :func:`gradient_snr`: the gradient signal-to-noise ratio of Rainforth et al. (2018).
- :func:`posterior_mean`: E_q[z | x] of any guide's site (averaged over upstream draws).
- :func:`active_units`: the latent dimensions whose posterior mean varies with the data
  (Burda et al. 2016); :func:`latent_activity` per latent layer (:func:`layer_sites`),
  :func:`count_active` summed over them.
- :func:`kl_per_dim`, :func:`mutual_information`, :func:`collapse_report`: posterior collapse
  per dimension and per layer (Dang et al. 2024).
- :func:`latent_relevance`: the ARD-VAE decoder-Jacobian relevance score (Saha et al. 2025);
  :func:`relevant_in_use`: the relevant set among the dimensions not collapsed.
- :func:`identification_r2`: R^2 of affine regressions from inferred to true latent groups
  (Gondur et al. 2024).
- :func:`sliced_wasserstein`, :func:`distributional_sliced_wasserstein`: distances between two
  samples (Bonneel et al. 2015; Nguyen et al. 2021), used to choose a Bayesian autoencoder's
  prior (Tran et al. 2021).
- :mod:`pvae.diagnostics.theory`: closed forms for collapse in linear conditional and 2-level
  hierarchical VAEs (Dang et al.).
"""

from pvae.diagnostics.collapse import (
    CollapseReport,
    KLPerDim,
    LayerReport,
    MutualInformation,
    collapse_report,
    kl_per_dim,
    mutual_information,
)
from pvae.diagnostics.identification import Identification, identification_r2
from pvae.diagnostics.latents import (
    ActiveUnits,
    active_units,
    count_active,
    latent_activity,
    layer_sites,
    posterior_mean,
)
from pvae.diagnostics.relevance import LatentRelevance, latent_relevance, relevant_in_use
from pvae.diagnostics.snr import GradientSNR, gradient_snr
from pvae.diagnostics.wasserstein import distributional_sliced_wasserstein, sliced_wasserstein
from pvae.evaluate import log_likelihood

__all__ = [
    "ActiveUnits",
    "CollapseReport",
    "GradientSNR",
    "Identification",
    "KLPerDim",
    "LatentRelevance",
    "LayerReport",
    "MutualInformation",
    "active_units",
    "collapse_report",
    "count_active",
    "distributional_sliced_wasserstein",
    "gradient_snr",
    "identification_r2",
    "kl_per_dim",
    "latent_activity",
    "latent_relevance",
    "layer_sites",
    "log_likelihood",
    "mutual_information",
    "posterior_mean",
    "relevant_in_use",
    "sliced_wasserstein",
]

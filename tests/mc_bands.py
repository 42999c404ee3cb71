"""Monte-Carlo bands set from the estimator's standard error.

A test that compares draws with an exact value uses a band of ``multiple`` standard errors of
the estimator (computed from the exact distribution, not from the draws), and checks that the
draws resolve a 20% error: the band must be a small fraction of the quantity, so a 20% error
lies many standard errors outside it.

Imported as ``from mc_bands import ...`` (``tests/`` is on ``sys.path`` through its
``conftest.py``).
"""

from __future__ import annotations

import torch

MULTIPLE = 5.0  # standard errors: a false alarm per entry has probability ~6e-7


def assert_gaussian_moments(
    draws: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    multiple: float = MULTIPLE,
    resolution: float = 0.05,
) -> None:
    """Sample mean and covariance of Gaussian ``draws (n, d)`` against ``mean (d,)`` and
    ``cov (d, d)``, entry by entry, within ``multiple`` standard errors:

        SE(mean_i) = sqrt(S_ii / n),   SE(cov_ij) = sqrt((S_ii S_jj + S_ij^2) / (n - 1))

    (the sampling variance of a Gaussian sample covariance). ``resolution``: the band on each
    variance must be at most this fraction of it, so that a 20% error in any variance lies at
    least ``0.2 / resolution`` bands away (n large enough).
    """
    draws, mean, cov = draws.double(), mean.double(), cov.double()
    n = draws.shape[0]
    var = cov.diagonal()
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / (n - 1)).sqrt()
    band_var = multiple * se_cov.diagonal()
    assert bool((band_var <= resolution * var).all()), (
        f"too few draws ({n}): the band on a variance is {float((band_var / var).max()):.3f} "
        f"of it, above {resolution}"
    )
    mean_error = (draws.mean(0) - mean).abs() / se_mean
    cov_error = (draws.T.cov() - cov).abs() / se_cov
    assert float(mean_error.max()) <= multiple, f"mean off by {float(mean_error.max()):.1f} SE"
    assert float(cov_error.max()) <= multiple, f"covariance off by {float(cov_error.max()):.1f} SE"


def assert_mean_within_se(
    draws: torch.Tensor, exact: torch.Tensor, multiple: float = MULTIPLE
) -> torch.Tensor:
    """Mean of ``draws (n, ...)`` against ``exact (...)`` within ``multiple`` standard errors
    estimated from the draws (``std / sqrt(n)``); returns the band ``(...)``."""
    n = draws.shape[0]
    band = multiple * draws.std(0) / n**0.5
    error = (draws.mean(0) - exact).abs()
    assert bool((error <= band).all()), f"off by {float((error / band).max()) * multiple:.1f} SE"
    return band

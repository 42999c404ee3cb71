"""Active units (Burda et al. 2016, "Importance Weighted Autoencoders", section 5.2).

A latent dimension u is *active* when its posterior mean moves with the data:

    A_u = Var_x( E_{q(z|x)}[z_u] ) > threshold        (threshold 0.01 in the paper)

It works for any guide: the guide is run (traced, without gradients) on batches of the data,
and the mean of the named site's distribution is read from the trace (``site["fn"].mean``, or
the average of a few samples for distributions without a closed-form mean).

Active units are counted per axis. A layer whose objective is rotation-invariant (an isotropic
Gaussian prior and encoder noise) can lose a direction of its latent space without losing an
axis: the posterior means then span fewer directions than there are active axes. The
eigenvalues of Cov_x(E_q[z | x]) (``directions``) count those directions with the same threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pvae.evaluate import Data, iter_batches, num_items
from pvae.protocol import trace_guide_site

__all__ = ["ActiveUnits", "active_units"]


@dataclass
class ActiveUnits:
    """What :func:`active_units` returns.

    ``count``: the number of active dimensions; ``variances``: Var_x(E_q[z|x]) per dimension
    ``(D,)`` (the site's event flattened); ``active``: the boolean mask ``variances >
    threshold``; ``threshold``: the threshold used; ``directions``: the eigenvalues of
    Cov_x(E_q[z|x]), descending ``(D,)`` (rotation-invariant; their sum is that of
    ``variances``).
    """

    count: int
    variances: torch.Tensor
    active: torch.Tensor
    threshold: float
    directions: torch.Tensor

    @property
    def active_directions(self) -> int:
        """The number of latent directions along which the posterior mean moves with x."""
        return int((self.directions > self.threshold).sum())

    @property
    def dims(self) -> int:
        """The number of latent dimensions examined."""
        return int(self.variances.numel())


def _site_mean(fn: Any, num_samples: int) -> torch.Tensor:
    try:
        mean = fn.mean
    except (NotImplementedError, AttributeError):
        mean = None
    if mean is None or not torch.isfinite(mean).all():  # e.g. Cauchy: fall back to samples
        mean = fn.sample((num_samples,)).mean(0)
    return mean


def active_units(
    guide: Callable,
    data: Data,
    site: str = "z",
    threshold: float = 0.01,
    batch_size: int = 500,
    num_samples: int = 16,
    num_runs: int = 32,
    **kwargs: Any,
) -> ActiveUnits:
    """Count the active latent dimensions of ``site`` under ``guide`` on ``data``.

    :param guide: any guide ``guide(*batch, **kwargs)`` that samples ``site`` once per
        datapoint (its first dimension the batch, as inside ``pyro.plate("data")``).
    :param data: a tensor ``(N, ...)``, a tuple of tensors (the guide's positional
        arguments), or a torch Dataset; at least two datapoints.
    :param site: the latent site's name.
    :param threshold: a dimension is active when the variance over datapoints of its
        posterior mean exceeds this (0.01, Burda et al.).
    :param batch_size: datapoints per guide call.
    :param num_samples: samples averaged when the site's distribution has no ``.mean``.
    :param num_runs: when the guide samples other latents before ``site`` (an upper layer of
        a bottom-up guide, q(z2 | z1)), the site's mean depends on those draws, and E_q[z | x]
        is the average over ``num_runs`` runs of the guide. The spread between runs would add
        to the variance over x; its share (the mean within-datapoint covariance divided by
        ``num_runs``) is subtracted, which makes the covariance estimate unbiased.
    :returns: :class:`ActiveUnits`.

    The guide runs without gradients and the global RNG state is left as it was.
    """
    n = num_items(data)
    if n < 2:
        raise ValueError(f"active_units needs at least 2 datapoints, got {n}")
    if batch_size < 1 or num_runs < 1:
        raise ValueError(f"batch_size and num_runs must be >= 1, got {batch_size}, {num_runs}")
    means = []
    within: torch.Tensor | float = 0.0  # sum over datapoints of the between-run covariance
    runs = 1
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in iter_batches(data, batch_size):
            node, upstream = trace_guide_site(guide, batch, kwargs, site)
            runs = num_runs if upstream else 1
            rows = batch[0].shape[0]
            draws = []
            for run in range(runs):
                if run:
                    node, _ = trace_guide_site(guide, batch, kwargs, site)
                mean = _site_mean(node["fn"], num_samples)
                if mean.dim() == 0 or mean.shape[0] != rows:
                    raise ValueError(
                        f"site {site!r} has a mean of shape {tuple(mean.shape)}; active_units "
                        f"needs one row per datapoint ({rows} in this batch), as inside "
                        "pyro.plate('data', ...)"
                    )
                draws.append(mean.reshape(rows, -1).double())
            stacked_runs = torch.stack(draws)  # (runs, rows, D)
            average = stacked_runs.mean(0)
            if runs > 1:
                spread = stacked_runs - average
                within = within + torch.einsum("srd,sre->de", spread, spread) / (runs - 1)
            means.append(average)
    stacked = torch.cat(means)
    dims = stacked.shape[1]
    covariance = torch.cov(stacked.T).reshape(dims, dims) - within / (n * runs)
    variances = covariance.diagonal().clamp(min=0.0)
    active = variances > threshold
    directions = torch.linalg.eigvalsh(covariance).flip(0).clamp(min=0.0)
    return ActiveUnits(int(active.sum()), variances, active, float(threshold), directions)

"""The ELBO of state-space pairs with the exact Kalman pieces: ``KalmanELBO``.

For a pair whose guide draws a latent trajectory ``x = x_{1:T}`` from a
:class:`~pvae.distributions.KalmanSmoothedPosterior` (the prior times per-step Gaussian
potentials, smoothed exactly) and whose model draws it from a
:class:`~pvae.distributions.StateSpacePrior`::

    ELBO(y) = E_q[log p(y | x)] - KL(q(x | y) || p(x))

- the KL is the closed form registered for the two distributions (smoothed marginals and
  lag-one cross-covariances: ``KL = -H[q] - E_q[log p(x)]``, or
  ``sum_t E_q[log N(y~_t | H_t x_t, V~_t)] - log Z`` when p has the parameters of q's own
  prior, equal values whether or not the same object);
- an observed site whose distribution is a
  :class:`~pvae.distributions.LinearGaussianEmission` ``prod_t N(y_t | C x_t + d, R)`` of that
  trajectory contributes its exact expectation (zero variance)::

      E_q[log p(y | x)] = sum_{t observed} log N(y_t | C m^s_t + d, R) - tr(R^{-1} C P^s_t C^T) / 2

  with ``m^s_t, P^s_t`` the smoothed marginals of q;
- an observed site that declares its closed-form expectation
  (:func:`pvae.protocol.expected_log_prob`) contributes it, as in :class:`pvae.inference.ELBO`;
- any other observed site (a neural decoder) is averaged over ``num_particles``
  reparameterised draws of the smoothed posterior (backward sampling), and any other latent
  site gets its registered KL or, failing one, ``log q - log p`` at the draw, as in
  :class:`pvae.inference.ELBO`.

With a linear-Gaussian emission and the exact posterior as the guide (potentials equal to the
emission) the value is ``log p(y)``, the Kalman filter's log-likelihood, with no Monte-Carlo
error. The engine knows only these distributions, never a model class: the emission declares
its latent site by name (``latent_site``), and the engine looks that site up in the guide's
trace. Per-datapoint terms (sites in ``pyro.plate("data")``: one sequence per datapoint) count
N/B times, global ones once; the reported bound is the ELBO itself.

Conjugate (natural-gradient) update of the prior's dynamics
-----------------------------------------------------------
SVAE (Johnson et al. 2016; Zhao & Linderman 2023) can move the LDS prior's (A, Q) by a natural
gradient step on the conjugate part of the bound: with step size 1 it is the EM update ``A =
S_10 S_00^{-1}``, ``Q = (S_11 - A S_10^T) / n`` from the smoothed statistics ``S_10 = sum E[x_t
x_{t-1}^T]`` etc. Measured (``benchmarks/kalman_conjugate_update.py``) on ``lds`` (defaults: D
= 2, M = 4, T = 50; 200 training sequences, seed 0) with a StructuredVAE whose decoder is
linear-Gaussian and whose potentials are exact, so the bound is the exact log-likelihood: Adam
(lr 0.05, full batch, every parameter) for 60 steps, with and without the conjugate (A, Q)
update after each step, three initialisation seeds. Steps to come within 1 nat per sequence of
the true parameters' log-likelihood (-90.25): 52, 53, 54 without the update, 52, 51, 52 with
it; bound after 60 steps: -90.77, -90.64, -90.50 without, -90.65, -90.43, -90.40 with. About
one step and 0.15 nats saved, for one extra full-batch smoothing pass per step, an update that
with a neural decoder uses the encoder's potentials rather than the posterior (so it is only
approximately natural), and a step that ``pyro.infer.SVI`` and ``pvae.fit`` cannot take.
KalmanELBO therefore has no conjugate step: every parameter, the prior's included, follows the
optimiser's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pvae.distributions import KalmanSmoothedPosterior, LinearGaussianEmission
from pvae.kl import kl_elements
from pvae.protocol import Reducer, check_reparameterized, expected_log_prob, latent_sites
from pvae.steps import attribute_settings

from .base import Engine

__all__ = ["KalmanELBO"]


def _is_state_space(fn: Any) -> bool:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return isinstance(fn, KalmanSmoothedPosterior)


class KalmanELBO(Engine):
    """The ELBO with the exact KL of the smoothed posterior and exact linear-Gaussian
    expectations; usable in ``pyro.infer.SVI`` and ``pvae.fit``, swappable with ELBO and IWAE.

    :param num_particles: smoothed-posterior draws averaged for the observed sites that are
        not linear-Gaussian in the trajectory (a neural decoder); unused otherwise.
    :param exact_emissions: use the closed-form expectation of
        :class:`~pvae.distributions.LinearGaussianEmission` sites (False: Monte-Carlo draws,
        for checks).
    :param vectorize_particles: draw the particles in one vectorised run of the pair (the
        default) or one per run, in a loop, for pairs that cannot be vectorised (see
        :class:`~pvae.inference.Engine`).
    :param max_plate_nesting: the pair's deepest plate nesting; guessed from a first run when
        omitted.
    :param data_plate: the name of the plate holding the datapoints (``"data"``).

    :raises ValueError: from the first step, when no guide latent site is a
        :class:`~pvae.distributions.KalmanSmoothedPosterior` (use ELBO for such pairs).
    """

    def __init__(
        self,
        num_particles: int = 1,
        exact_emissions: bool = True,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        data_plate: str = "data",
    ):
        super().__init__(num_particles, vectorize_particles, max_plate_nesting, data_plate)
        self.exact_emissions = bool(exact_emissions)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **attribute_settings(self, "exact_emissions")}

    def _log_likelihood_term(self, site: Any, guide_trace: Any) -> torch.Tensor:
        """The site's log-density tensor, or its exact expectation under the smoothed
        posterior when it is a linear-Gaussian emission of a smoothed trajectory."""
        fn = site["fn"]
        if self.exact_emissions and isinstance(fn, LinearGaussianEmission):
            guide_site = guide_trace.nodes.get(fn.latent_site)
            if guide_site is None or guide_site["type"] != "sample":
                raise ValueError(
                    f"observed site {site['name']!r} is linear-Gaussian in latent site "
                    f"{fn.latent_site!r}, which the guide does not sample"
                )
            q = guide_site["fn"]
            if isinstance(q, KalmanSmoothedPosterior):
                return fn.expected_log_prob(q, site["value"])
        expected = expected_log_prob(site)  # a closed form the site declares (ELBO-only)
        return fn.log_prob(site["value"]) if expected is None else expected

    def objective(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bound: torch.Tensor | float = 0.0
        draws = self.particles(model, guide, args, kwargs, self.num_particles)
        for model_trace, guide_trace, reduce in draws:
            check_reparameterized(guide_trace, "KalmanELBO")
            sites = list(latent_sites(model_trace, guide_trace))
            if not any(_is_state_space(g["fn"]) for _, g, _ in sites):
                raise ValueError(
                    "KalmanELBO needs a guide latent site drawn from a KalmanSmoothedPosterior "
                    f"(the guide's latent sites: {', '.join(n for n, _, _ in sites) or 'none'}); "
                    "use ELBO or IWAE for other pairs"
                )
            value: torch.Tensor | float = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"]:
                    term = self._log_likelihood_term(site, guide_trace)
                    value = value + _total(reduce(term, site), reduce, site)
            for _, guide_site, model_site in sites:
                elements, event_dims = kl_elements(
                    guide_site["fn"], model_site["fn"], guide_site["value"]
                )
                value = value - _total(reduce(elements, guide_site, event_dims), reduce, guide_site)
            bound = bound + value / len(draws)
        bound_t = torch.as_tensor(bound)
        return -bound_t, bound_t.detach()


def _total(term: torch.Tensor, reduce: Reducer, site: Any) -> torch.Tensor:
    """Full-data value of a reduced ``(K', B', D)`` term, averaged over particles: summed over
    the batch and scaled by N/B for sites in the data plate, counted once otherwise."""
    value = term.sum(-1).mean(0).sum()
    return reduce.data_scale * value if reduce.is_local(site) else value

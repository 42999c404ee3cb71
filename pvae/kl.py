"""KL(q || p) of one latent site, shared by the ELBO engine and the collapse diagnostics.

For a latent site with guide distribution q and model (prior) distribution p, evaluated at the
guide's draw z::

    analytic:     KL(q || p)                       where torch.distributions.kl_divergence
                                                   has the pair registered
    Monte Carlo:  log q(z) - log p(z)              (an unbiased one-draw estimate otherwise)

Matching ``Independent`` wrappers (``Normal(...).to_event(1)`` against another ``.to_event(1)``)
are unwrapped first, so the result keeps one element per latent dimension: its trailing
``event_dims`` dimensions are the site's event dimensions, to be summed for the site's KL or
read per dimension (free bits, KL per dimension). When the bases are themselves multivariate
(a ``MultivariateNormal``), or the wrappers do not match, the site's KL is one number per
draw and ``event_dims`` is 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Independent, kl_divergence

from pvae.protocol import latent_sites

__all__ = ["is_analytic", "kl_elements", "same_sampling_order", "split_independent"]


def split_independent(q: Any, p: Any) -> tuple[Any, Any, int]:
    """Strip matching ``Independent`` wrappers of ``q`` and ``p``.

    :returns: ``(q_base, p_base, event_dims)``: the bases and the number of event dimensions
        the stripped wrappers reinterpreted (0 when nothing matched).
    """
    event_dims = 0
    while (
        isinstance(q, Independent)
        and isinstance(p, Independent)
        and q.reinterpreted_batch_ndims == p.reinterpreted_batch_ndims
    ):
        event_dims += q.reinterpreted_batch_ndims
        q, p = q.base_dist, p.base_dist
    return q, p, event_dims


def is_analytic(q: Any, p: Any) -> bool:
    """Whether :func:`kl_elements` finds a closed form for the pair (after unwrapping)."""
    q_base, p_base, _ = split_independent(q, p)
    try:
        kl_divergence(q_base, p_base)
    except NotImplementedError:
        return False
    return True


def kl_elements(
    q: Any, p: Any, value: torch.Tensor | None = None, analytic: bool = True
) -> tuple[torch.Tensor, int]:
    """KL(q || p) of one site, with one element per latent dimension where they separate.

    :param q: the guide's distribution of the site (batch shape ``B``, event shape ``E``).
    :param p: the model's distribution of the site (same shapes, or broadcastable).
    :param value: the guide's draw z, shape ``B + E`` (needed for the Monte-Carlo estimate).
    :param analytic: use the closed form where ``kl_divergence`` has the pair registered.
    :returns: ``(elements, event_dims)``: ``elements`` of shape ``B + E[-event_dims:]``-like
        (the batch shape followed by the ``event_dims`` event dimensions that separate);
        summing its last ``event_dims`` dimensions gives the site's KL per draw.
    """
    q_base, p_base, event_dims = split_independent(q, p)
    if analytic:
        try:
            return kl_divergence(q_base, p_base), event_dims
        except NotImplementedError:
            pass
    if value is None:
        raise ValueError(
            f"no closed-form KL for {type(q_base).__name__} || {type(p_base).__name__}: "
            "the Monte-Carlo estimate needs the draw (value=)"
        )
    if event_dims and not q_base.event_shape and not p_base.event_shape:
        return q_base.log_prob(value) - p_base.log_prob(value), event_dims
    return q.log_prob(value) - p.log_prob(value), 0


def same_sampling_order(model_trace: Any, guide_trace: Any) -> bool:
    """Whether the model samples the guide's latents in the guide's order.

    Analytic KLs evaluate p at the guide's draws of the latents sampled before the site; when
    the model samples them in another order, the conditional priors differ from those the
    bound integrates, and only the Monte-Carlo estimate is valid.
    """
    guide_order = [name for name, _, _ in latent_sites(model_trace, guide_trace)]
    latent = set(guide_order)
    model_order = [name for name in model_trace.nodes if name in latent]
    return guide_order == model_order

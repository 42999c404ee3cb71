"""Latent relevance: which latent dimensions the decoder uses (the ARD-VAE score of Saha et al.
2025, "Automatic Relevance Determination in Variational Autoencoders").

For each latent dimension d, with mu(x) the guide's mean of the site and x_hat(z) = decode(z):

    score_d = v_d * sum_pixels ( mean_n | d x_hat(mu(x_n)) / d mu_d | )^2

where v_d is the variance of dimension d: the aggregate posterior's second moment
mean_n E_q[z_d^2 | x_n] (ARD-VAE's prior variance, estimated from the encodings), or a given
prior variance. The relevant set is the fewest dimensions, taken by decreasing score, that
reach ``threshold`` (99%) of the total score. v_d alone does not separate relevant from
irrelevant dimensions (a dimension can have a large variance the decoder ignores), and the
Jacobian alone does not either (a dimension the decoder reads but that never moves).

The Jacobian columns d x_hat / d mu_d are computed with forward-mode autodiff
(``torch.autograd.forward_ad``, which works through ``@torch.no_grad()`` decoders such as the zoo's
``.decode``), or with central finite differences when the decoder does not support it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad

from pvae.diagnostics.latents import active_units
from pvae.evaluate import Data, iter_batches, num_items
from pvae.protocol import trace_guide_site

__all__ = [
    "LatentRelevance",
    "latent_relevance",
    "relevance_scores",
    "relevant_in_use",
    "relevant_set",
]


def relevance_scores(variance: torch.Tensor, mean_abs_jacobian: torch.Tensor) -> torch.Tensor:
    """``score_d = v_d * sum_pixels (mean_n |d x_hat / d mu_d|)^2``.

    :param variance: v_d, ``(D,)``.
    :param mean_abs_jacobian: ``mean_n |d x_hat_i / d mu_d|``, ``(D, pixels)``.
    :returns: ``(D,)``.
    """
    return variance * mean_abs_jacobian.pow(2).sum(-1)


def relevant_set(scores: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fewest dimensions, by decreasing score, whose scores reach ``mass`` of the total.

    :returns: ``(order, cumulative, count)``: dimensions by decreasing score (ties by index),
        the cumulative share along ``order`` (ones when every score is 0), and the size of
        the relevant set ``order[:count]`` (0 when every score is 0).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    total = scores.sum()
    if total <= 0:
        return order, torch.ones_like(scores), 0
    cumulative = scores[order].cumsum(0) / total
    count = int((cumulative < mass - 1e-12).sum()) + 1  # tolerating rounding
    return order, cumulative, min(count, scores.numel())


@dataclass
class LatentRelevance:
    """What :func:`latent_relevance` returns.

    ``scores``: score_d ``(D,)``; ``ranking``: dimensions by decreasing score; ``cumulative``:
    the cumulative share of the total score along ``ranking`` ``(D,)``; ``relevant``: the
    smallest set of dimensions reaching ``threshold`` (in ranking order); ``variance``: v_d;
    ``jacobian_norm``: ``sum_pixels (mean_n |d x_hat / d mu_d|)^2``; ``activity``: Var_x E_q[z_d|x]
    (active units); ``kl``: mean KL per dimension when a model was given, else None.
    """

    scores: torch.Tensor
    ranking: list[int]
    cumulative: torch.Tensor
    relevant: list[int]
    threshold: float
    variance: torch.Tensor
    jacobian_norm: torch.Tensor
    activity: torch.Tensor
    kl: torch.Tensor | None = None

    @property
    def num_relevant(self) -> int:
        return len(self.relevant)


def relevant_in_use(relevance: LatentRelevance, collapsed: Sequence[int]) -> list[int]:
    """The relevant set among the dimensions that are not ``collapsed``: the fewest of them,
    by decreasing score, whose scores reach ``relevance.threshold`` of their total (a
    collapsed dimension carries no information about x, so it is never relevant).

    :param relevance: a :class:`LatentRelevance` of ``D`` dimensions.
    :param collapsed: dimensions (in ``range(D)``) whose posterior is the prior.
    :returns: the chosen dimensions by decreasing score; empty when their scores are all 0.
    """
    in_use = [d for d in relevance.ranking if d not in set(collapsed)]
    total = sum(float(relevance.scores[d]) for d in in_use)
    chosen: list[int] = []
    share = 0.0
    for d in in_use:
        if total <= 0 or share >= relevance.threshold - 1e-12:
            break
        chosen.append(d)
        share += float(relevance.scores[d]) / total
    return chosen


def _jacobian_columns(decode: Callable, mu: torch.Tensor, step: float) -> torch.Tensor:
    """``|d decode(mu) / d mu_d|`` for every d: ``(D, B, pixels)``."""
    columns = []
    for d in range(mu.shape[-1]):
        tangent = torch.zeros_like(mu)
        tangent[..., d] = 1.0
        try:
            # torch loads its forward-AD decompositions with torch.jit on first use, which warns
            with warnings.catch_warnings(), forward_ad.dual_level():
                warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
                column = forward_ad.unpack_dual(decode(forward_ad.make_dual(mu, tangent))).tangent
            if column is None:  # the output does not depend on mu
                column = torch.zeros_like(decode(mu))
        except (RuntimeError, NotImplementedError):
            column = (decode(mu + step * tangent) - decode(mu - step * tangent)) / (2 * step)
        columns.append(column.reshape(mu.shape[0], -1).abs().double())
    return torch.stack(columns)


def _decoder_sums(
    guide: Callable,
    decode: Callable[[torch.Tensor], torch.Tensor],
    data: Data,
    site: str,
    batch_size: int,
    step: float,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Over the datapoints: the sums of ``|d decode(mu) / d mu_d|`` ``(D, pixels)`` and of
    ``mu_d^2 + var_d`` ``(D,)`` (mu, var: the guide's mean and variance of ``site``), and N."""
    abs_sum: torch.Tensor | None = None
    second_moment: torch.Tensor | None = None
    n = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in iter_batches(data, batch_size):
            node, _ = trace_guide_site(guide, batch, kwargs, site)
            rows = batch[0].shape[0]
            fn: Any = node["fn"]
            try:
                mu, var = fn.mean, fn.variance
            except (NotImplementedError, AttributeError):
                draws = fn.sample((64,))
                mu, var = draws.mean(0), draws.var(0)
            if mu.dim() < 1 or mu.shape[0] != rows:
                raise ValueError(
                    f"site {site!r} has a mean of shape {tuple(mu.shape)}; latent_relevance "
                    f"needs one row per datapoint ({rows} in this batch)"
                )
            mu, var = mu.reshape(rows, -1), var.reshape(rows, -1)
            columns = _jacobian_columns(decode, mu, step)  # (D, B, pixels)
            part = columns.sum(1)
            abs_sum = part if abs_sum is None else abs_sum + part
            moment = (mu.double() ** 2 + var.double()).sum(0)
            second_moment = moment if second_moment is None else second_moment + moment
            n += rows
    assert abs_sum is not None and second_moment is not None
    return abs_sum, second_moment, n


def latent_relevance(
    guide: Callable,
    decode: Callable[[torch.Tensor], torch.Tensor],
    data: Data,
    site: str = "z",
    threshold: float = 0.99,
    prior_variance: torch.Tensor | None = None,
    model: Callable | None = None,
    batch_size: int = 500,
    step: float = 1e-3,
    **kwargs: Any,
) -> LatentRelevance:
    """Rank the latent dimensions of ``site`` by the ARD-VAE relevance score.

    :param guide: any guide sampling ``site`` once per datapoint, inside
        ``pyro.plate("data")``; its distribution's ``.mean`` is mu.
    :param decode: ``decode(z) -> x_hat``, the mean of p(x | z) for ``z`` of shape
        ``(batch, D)`` (the zoo's ``model.decode``); ``x_hat`` of shape ``(batch, ...)``.
    :param data: a tensor, a tuple of tensors (the guide's positional arguments) or a Dataset.
    :param threshold: share of the total score the relevant set must reach (0.99).
    :param prior_variance: v_d ``(D,)``; by default the aggregate posterior's second moment.
    :param model: when given, the mean KL per dimension (:func:`kl_per_dim`) is reported too.
    :param step: finite-difference step, used only when forward-mode autodiff fails.
    :returns: :class:`LatentRelevance`.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_items(data) < 1:
        raise ValueError("latent_relevance needs at least one datapoint")
    abs_sum, second_moment, n = _decoder_sums(guide, decode, data, site, batch_size, step, kwargs)
    jacobian_norm = relevance_scores(torch.ones(()), abs_sum / n)  # (D,)
    if prior_variance is not None:
        variance = torch.as_tensor(prior_variance, dtype=torch.float64).flatten()
        if variance.shape != jacobian_norm.shape:
            raise ValueError(
                f"prior_variance must have shape {tuple(jacobian_norm.shape)}, got "
                f"{tuple(variance.shape)}"
            )
    else:
        variance = second_moment / n
    scores = relevance_scores(variance, abs_sum / n)
    order, cumulative, count = relevant_set(scores, threshold)
    ranking = [int(d) for d in order]
    activity = active_units(guide, data, site=site, batch_size=batch_size, **kwargs).variances
    kl = None
    if model is not None:
        from pvae.diagnostics.collapse import kl_per_dim

        kl = kl_per_dim(model, guide, data, site=site, batch_size=batch_size, **kwargs).kl
    return LatentRelevance(
        scores=scores,
        ranking=ranking,
        cumulative=cumulative,
        relevant=ranking[:count],
        threshold=float(threshold),
        variance=variance,
        jacobian_norm=jacobian_norm,
        activity=activity,
        kl=kl,
    )

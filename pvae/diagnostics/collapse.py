"""Posterior collapse: KL per latent dimension, mutual information and a collapse report, for
any model/guide pair.

KL per dimension (per datapoint n, latent dimension d of a site):

    KL_nd = KL( q(z_d | x_n) || p(z_d) )

read from the traces: the guide is run on a batch, the model is replayed on the guide's
samples, and the pair of site distributions gives the KL. It is analytic where
``torch.distributions.kl_divergence`` has the pair registered (``Independent`` unwrapped), with
``p``'s parameters as the model computes them *given the guide's samples of the other
latents*, so conditional priors (CVAE prior networks, the layers of a hierarchical VAE) are
handled; averaging over ``num_particles`` guide draws gives E_q[KL(q(z_l | ...) || p(z_l |
z_{l+1}))]. Otherwise it is the Monte-Carlo estimate log q(z_d | x) - log p(z_d) averaged over
the draws. The per-site KL is :func:`pvae.kl.kl_elements`, the ELBO engine's own, with its rule that
analytic KLs need the model and the guide to sample latents in the same order.
A guide whose site does not factorise over dimensions (a full-covariance
``MultivariateNormal``) gets the KLs of its marginals, q(z_d | x) = N(mu_d, Sigma_dd), against a
factorised prior; their sum is then below the site's joint KL by the total correlation of q.

Mutual information (Hoffman & Johnson 2016; He et al. 2019; Dang et al. 2024):

    I(x; z) = E_x KL(q(z|x) || p(z)) - KL(q(z) || p(z)) = E_{x, z~q(z|x)}[log q(z|x) - log q(z)]
    log q(z_n) ~ logsumexp_j log q(z_n | x_j) - log M          (j over M datapoints)

The aggregate posterior costs O(M^2 D) density evaluations, so it is taken over a random subset
of at most ``max_points`` datapoints (1000 by default: a million pairs). The estimate is
biased down by at most log M (it is bounded by log M) and is meaningful when I << log M. Its
expectation is not negative (with the guide's own density as the critic it is the InfoNCE
bound, log M minus the cross-entropy of the Bayes classifier of which x_j drew z), so a
negative value is Monte-Carlo noise: the result is floored at 0 and reported with its standard
error (the spread of the per-datapoint terms over sqrt(M)).

Collapse report (Dang et al., ICLR 2024, "Beyond Vanilla Variational Autoencoders: Detecting
Posterior Collapse in Conditional and Hierarchical Variational Autoencoders"): per site (layer)
and dimension, the mean KL, the activity Var_x E_q[z_d | x] (:func:`active_units`), whether the
dimension collapsed (mean KL below ``kl_threshold``), and the fraction of (datapoint,
dimension) pairs with KL_nd < ``epsilon`` (0.01 in the paper); with a plain-language verdict.
A layer whose conditional prior p(z_l | z_{l+1}) is evaluated at a z_{l+1} that the guide drew
*from* z_l (bottom-up inference; ``KLPerDim.conditional``) has E_q[log q(z_l | x) - log p(z_l |
z_{l+1})], not a KL: it can be zero or negative while z_l carries information about x
(measured on a linear 2-level HVAE, tests/core/test_theory.py). For such a layer a dimension
counts as collapsed only when it is also inactive. The report also counts the directions along
which a layer's posterior means move (:class:`ActiveUnits`): a layer with an isotropic prior
and encoder noise can lose a direction that is not one of its axes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from pvae.diagnostics.latents import (
    ActiveUnits,
    Channels,
    active_units,
    channel_layout,
    to_channels,
)
from pvae.evaluate import Data, get_batch, iter_batches, num_items
from pvae.kl import is_analytic, kl_elements, same_sampling_order
from pvae.protocol import (
    Reducer,
    find_data_frame,
    get_traces,
    guess_max_plate_nesting,
    latent_names,
    latent_sites,
    trace_guide_site,
)

__all__ = [
    "CollapseReport",
    "KLPerDim",
    "LayerReport",
    "MutualInformation",
    "collapse_report",
    "kl_per_dim",
    "mutual_information",
]


# --------------------------------------------------------------------------------------------
# KL per dimension.


@dataclass
class KLPerDim:
    """What :func:`kl_per_dim` returns.

    ``site``: the latent site; ``per_datapoint``: KL_nd, ``(N, D)`` (the site's event
    flattened), nats; ``analytic``: whether closed-form KLs were used (else Monte Carlo);
    ``marginal``: True when the guide's site did not factorise and the values are the KLs of
    its one-dimensional marginals; ``conditional``: True when the model samples, before this
    site, a latent that the guide samples after it (bottom-up inference in a hierarchy): the
    prior is then evaluated at latents drawn *from* this site, and the values are
    E_q[log q - log p], not KLs; they can be negative while the site carries information.
    """

    site: str
    per_datapoint: torch.Tensor
    analytic: bool
    marginal: bool = False
    conditional: bool = False

    @property
    def kl(self) -> torch.Tensor:
        """E_x KL(q(z_d | x) || p(z_d)) per dimension, ``(D,)``."""
        return self.per_datapoint.mean(0)

    @property
    def total(self) -> float:
        """The site's mean KL summed over dimensions (nats per datapoint)."""
        return float(self.kl.sum())

    @property
    def dims(self) -> int:
        return int(self.per_datapoint.shape[1])

    def fraction_below(self, epsilon: float = 0.01) -> float:
        """The share of (datapoint, dimension) pairs with KL_nd < ``epsilon`` (Dang et al.)."""
        return float((self.per_datapoint < epsilon).double().mean())


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _marginal_kl(guide_site: dict, model_site: dict) -> tuple[torch.Tensor, bool] | None:
    """KL of the 1-d marginals of a vector-valued q against a factorised prior, and whether
    it is analytic: closed form for a ``MultivariateNormal`` q and a Normal prior; otherwise,
    for a q with ``marginal_log_prob(value)`` (per-dimension marginal log-densities, e.g. a
    mixture of diagonal Gaussians), the Monte-Carlo estimate log q_d(z_d) - log p_d(z_d) at
    the guide's draw. A q and p with the same multi-axis event (a ``(T, C)`` state path, a
    smoothed posterior against a dynamical prior) get the closed-form KL of their 1-d
    marginals per element, from their ``mean`` and ``variance``. A factorised q against a
    prior with ``log_prob_elements(value)`` (per-element conditional log-densities, e.g. a
    sequential prior p(z_tc | z_<t)) gets the Monte-Carlo chain-rule terms
    log q(z_tc) - log p(z_tc | z_<t), which add up to the site's KL."""
    q, p = guide_site["fn"], model_site["fn"]
    if isinstance(p, Independent) and p.reinterpreted_batch_ndims == 1:
        p = p.base_dist
    if isinstance(q, MultivariateNormal) and isinstance(p, Normal):
        return kl_divergence(Normal(q.mean, q.variance.sqrt()), p), True
    while isinstance(q, ExpandedDistribution):  # as pyro.plate wraps a batched q
        q = q.base_dist
    while isinstance(p, ExpandedDistribution):
        p = p.base_dist
    log_prob_elements = getattr(p, "log_prob_elements", None)
    if (
        callable(log_prob_elements)
        and isinstance(q, Independent)
        and not q.base_dist.event_shape
        and q.event_shape == p.event_shape
    ):  # a factorised q against a sequential prior: chain-rule terms per element
        z = guide_site["value"]
        return q.base_dist.log_prob(z) - log_prob_elements(z), False
    if len(q.event_shape) > 1 and q.event_shape == p.event_shape:  # e.g. (T, C) state paths
        try:  # the 1-d marginals KL(N(m_tc, v_tc) || N(mu_tc, s_tc)) per element
            q_marginal = Normal(q.mean, q.variance.sqrt())
            return kl_divergence(q_marginal, Normal(p.mean, p.variance.sqrt())), True
        except (NotImplementedError, AttributeError):
            return None
    marginal_log_prob = getattr(q, "marginal_log_prob", None)
    if callable(marginal_log_prob) and not p.event_shape:
        z = guide_site["value"]
        return marginal_log_prob(z) - p.log_prob(z), False
    return None


def _check_sites(
    found: Mapping[str, Any], local: Sequence[str], sites: Sequence[str] | None
) -> list[str]:
    """The sites to report, in order: ``sites`` (each checked to be a latent inside the data
    plate), or every local latent in natural order for ``None``."""
    if sites is None:
        order = sorted(local, key=_natural_key)
        if not order:
            raise ValueError("the guide has no latent site inside pyro.plate('data')")
        return order
    for name in sites:
        if name not in found:
            raise ValueError(
                f"the guide has no latent site {name!r}; its latent sites are: "
                f"{', '.join(found) or 'none'}"
            )
        if name not in local:
            raise ValueError(
                f"latent site {name!r} is outside pyro.plate('data') (a global "
                "latent); KL per datapoint needs a per-datapoint site"
            )
    return list(sites)


def _not_per_channel(name: str, event_shape: tuple[int, ...]) -> str:
    return (
        f"site {name!r}: its KL does not separate over the event axes {event_shape} (the "
        "guide's distribution is not factorised), so it cannot be reported per channel"
    )


def _site_term(
    name: str,
    guide_site: dict,
    model_site: dict,
    reducer: Reducer,
    use_analytic: bool,
    channels: Mapping[str, Channels] | None,
) -> tuple[torch.Tensor, bool, bool]:
    """One batch's KL terms of site ``name``: ``(B, D)`` (``(B, C)`` per channel), whether they
    are analytic, and whether they are per-element marginal KLs."""
    # The KL of the distributions themselves: drop the site's scale (a per-layer beta, a
    # kl_weight), keep its mask.
    unscaled = {**guide_site, "scale": 1.0}
    q, p = guide_site["fn"], model_site["fn"]
    elements, event_dims = kl_elements(q, p, guide_site["value"], use_analytic)
    marginal = False
    event_shape = tuple(q.event_shape)
    event_size = math.prod(event_shape)
    if event_dims == 0 and event_size > 1:
        marginal_kl = _marginal_kl(guide_site, model_site)
        if marginal_kl is not None:
            (elements, use_site_analytic), event_dims = marginal_kl, 1
            if tuple(elements.shape[-len(event_shape) :]) == event_shape:
                event_dims = len(event_shape)  # per element of a (T, C) event
            marginal = True
        else:
            use_site_analytic = use_analytic
    else:
        use_site_analytic = use_analytic and is_analytic(q, p)
    term = reducer(elements, unscaled, event_dims).mean(0).double()  # (B, D)
    axes = channel_layout(channels, name, event_shape)
    if axes is not None and 0 < event_dims < len(event_shape):
        if axes != tuple(range(event_dims)):  # KL_c separates over channels first
            raise ValueError(_not_per_channel(name, event_shape))
    elif axes is not None:
        if event_dims != len(event_shape):
            raise ValueError(_not_per_channel(name, event_shape))
        term = to_channels(term.reshape(term.shape[:1] + event_shape), event_shape, axes)
        term = term.sum(-2)  # KL_c = sum_t KL_tc
    return term, use_site_analytic, marginal


def _site_kls(
    model: Callable,
    guide: Callable,
    data: Data,
    sites: Sequence[str] | None,
    batch_size: int,
    num_particles: int,
    analytic: bool,
    kwargs: dict,
    channels: Mapping[str, Channels] | None = None,
) -> tuple[dict[str, KLPerDim], list[str]]:
    """KL_nd for each requested local latent site (all of them for ``sites=None``)."""
    if batch_size < 1 or num_particles < 1:
        raise ValueError(
            f"batch_size and num_particles must be >= 1, got {batch_size}, {num_particles}"
        )
    rows: dict[str, list[torch.Tensor]] = {}
    flags: dict[str, tuple[bool, bool]] = {}
    conditional: dict[str, bool] = {}
    order: list[str] | None = None
    nesting: int | None = None
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in iter_batches(data, batch_size):
            if nesting is None:
                nesting = guess_max_plate_nesting(model, guide, batch, kwargs)
            model_trace, guide_trace = get_traces(
                model, guide, batch, kwargs, num_particles, nesting
            )
            reducer = Reducer(nesting, find_data_frame(guide_trace, model_trace))
            frame = reducer.data_frame
            if frame is None or frame.size != batch[0].shape[0]:
                raise ValueError(
                    "KL diagnostics need the per-datapoint latents inside pyro.plate('data', "
                    f"...) covering the whole batch ({batch[0].shape[0]} rows), without "
                    "subsample_size"
                )
            found = {name: (g, m) for name, g, m in latent_sites(model_trace, guide_trace)}
            if order is None:
                local = [name for name, (g, _) in found.items() if reducer.is_local(g)]
                order = _check_sites(found, local, sites)
                conditional = _conditioned_on_later(model_trace, guide_trace, order)
            use_analytic = analytic and same_sampling_order(model_trace, guide_trace)
            for name in order:
                term, use_site_analytic, marginal = _site_term(
                    name, *found[name], reducer, use_analytic, channels
                )
                rows.setdefault(name, []).append(term)
                flags[name] = (use_site_analytic, marginal)
    assert order is not None
    results = {
        name: KLPerDim(
            name, torch.cat(rows[name]), flags[name][0], flags[name][1], conditional[name]
        )
        for name in order
    }
    return results, order


def _conditioned_on_later(model_trace: Any, guide_trace: Any, names: Sequence[str]) -> dict:
    """Per site: does the model sample, before it, a latent that the guide samples after it?"""

    in_model, in_guide = latent_names(model_trace), latent_names(guide_trace)
    result = {}
    for name in names:
        before = set(in_model[: in_model.index(name)]) if name in in_model else set()
        after = set(in_guide[in_guide.index(name) + 1 :]) if name in in_guide else set()
        result[name] = bool(before & after)
    return result


def kl_per_dim(
    model: Callable,
    guide: Callable,
    data: Data,
    site: str = "z",
    batch_size: int = 500,
    num_particles: int = 10,
    analytic: bool = True,
    channels: Mapping[str, Channels] | None = None,
    **kwargs: Any,
) -> KLPerDim:
    """KL(q(z_d | x_n) || p(z_d)) for every datapoint n and dimension d of ``site``.

    :param model, guide: any pair whose site ``site`` sits inside ``pyro.plate("data")``.
    :param data: a tensor ``(N, ...)``, a tuple of tensors (the pair's positional arguments),
        or a torch Dataset.
    :param site: the latent site.
    :param batch_size: datapoints per run of the pair.
    :param num_particles: vectorised guide draws averaged per datapoint (Monte-Carlo KLs, and
        analytic KLs whose prior depends on other sampled latents).
    :param analytic: use closed-form KLs where registered.
    :param channels: a dimension map ``{site: channel axes}`` (see
        :mod:`pvae.diagnostics.latents`): a site with event shape ``(T, C)`` and
        ``channels={site: -1}`` gets KL_nc = sum_t KL_ntc, ``(N, C)``.
    :returns: :class:`KLPerDim`; ``.kl`` is the ``(D,)`` mean over datapoints (``(C,)`` per
        channel).

    Runs without gradients and leaves the global random state as it found it.
    """
    results, _ = _site_kls(
        model, guide, data, [site], batch_size, num_particles, analytic, kwargs, channels
    )
    return results[site]


# --------------------------------------------------------------------------------------------
# Mutual information.


@dataclass
class MutualInformation:
    """What :func:`mutual_information` returns.

    ``total``: I(x; z) for the site, nats, never negative; ``stderr``: its standard error;
    ``estimate``: the raw estimate before it is floored at 0; ``per_dim``: I(x; z_d) per
    dimension ``(D,)``, floored at 0 likewise (None when the guide's site does not factorise
    over dimensions); ``per_dim_stderr``: their standard errors; ``num_points``: the M
    datapoints of the aggregate posterior (the estimate cannot exceed log M).
    """

    site: str
    total: float
    per_dim: torch.Tensor | None
    num_points: int
    stderr: float = 0.0
    estimate: float = 0.0
    per_dim_stderr: torch.Tensor | None = None


def _mi_terms(log_q: torch.Tensor) -> torch.Tensor:
    """``log_q[s, n, j, ...]`` = log q(z_n^s | x_j): per datapoint n, the mean over s of
    log q(z|x_n) - log q(z), with the aggregate posterior taken over j; shape ``(M, ...)``."""
    m = log_q.shape[2]
    own = log_q.diagonal(dim1=1, dim2=2)  # (S, ..., M): the diagonal moves to the end
    own = own.movedim(-1, 1)
    aggregate = torch.logsumexp(log_q, dim=2) - math.log(m)
    return (own - aggregate).mean(0)


def _mi_from_log_q(log_q: torch.Tensor) -> torch.Tensor:
    """The estimate: :func:`_mi_terms` averaged over the datapoints."""
    return _mi_terms(log_q).mean(0)


def _mean_and_stderr(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first dimension and its standard error (std / sqrt(M))."""
    m = terms.shape[0]
    return terms.mean(0), terms.std(0) / math.sqrt(m)


def _log_q(
    fn: Any, base: Any, z: torch.Tensor, axes: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log q(z_n^s | x_j)`` for the draws ``z (S, M, *event)`` of ``fn`` (batch ``(M,)``)
    against every datapoint j: ``(S, M, M)``, and, where ``base`` is the factorised guide's
    per-element distribution, per dimension ``(S, M, M, D)`` (per channel ``(S, M, M, C)``,
    summed over time, for channel ``axes``), else None. Chunked over n so that at most ~4e6
    densities are alive at once."""
    num_samples, m = z.shape[0], z.shape[1]
    event_shape = tuple(fn.event_shape)
    dims = int(math.prod(event_shape)) if event_shape else 1
    chunk = max(1, int(4e6 // (num_samples * m * max(dims, 1))))
    joint_parts: list[torch.Tensor] = []
    dim_parts: list[torch.Tensor] = []
    for start in range(0, m, chunk):
        zc = z[:, start : start + chunk]  # (S, c, *event)
        zc = zc.unsqueeze(2)  # (S, c, 1, *event): against every x_j
        if base is not None:
            per = base.log_prob(zc).double()  # (S, c, M, *event)
            if axes is None:
                per = per.reshape(per.shape[:3] + (-1,))
            else:  # (S, c, M, C): summed over time
                per = to_channels(per, event_shape, axes).sum(-2)
            dim_parts.append(per)
            joint_parts.append(per.sum(-1))
        else:
            joint_parts.append(fn.log_prob(zc).double())  # (S, c, M)
    per_element = torch.cat(dim_parts, 1) if base is not None else None
    return torch.cat(joint_parts, 1), per_element


def mutual_information(
    guide: Callable,
    data: Data,
    site: str = "z",
    max_points: int = 1000,
    num_samples: int = 1,
    seed: int = 0,
    channels: Mapping[str, Channels] | None = None,
    **kwargs: Any,
) -> MutualInformation:
    """The I(x; z) estimate E[log q(z|x)] - E[log q(z)] with q(z) = (1/M) sum_j q(z | x_j).

    :param guide: any guide that samples ``site`` once per datapoint, as inside
        ``pyro.plate("data")`` (the site's distribution has batch shape ``(batch,)``).
    :param data: as for :func:`kl_per_dim`.
    :param max_points: the aggregate posterior runs over a random subset of at most this many
        datapoints (cost O(M^2 D) time; memory is chunked).
    :param num_samples: draws of z per datapoint.
    :param seed: seeds the choice of the subset.
    :param channels: a dimension map ``{site: channel axes}`` (see
        :mod:`pvae.diagnostics.latents`): ``per_dim`` is then I(x; z_{., c}) per channel, the
        channel's log-densities summed over the other event axes (time).
    :returns: :class:`MutualInformation`.

    For a site whose guide distribution depends on other sampled latents (the upper layers of
    a bottom-up hierarchical guide), q(z | x_j) is the conditional given the guide's draw of
    those: a one-sample stand-in for the marginal.
    """

    n = num_items(data)
    if n < 2:
        raise ValueError(f"mutual_information needs at least 2 datapoints, got {n}")
    if max_points < 2 or num_samples < 1:
        raise ValueError(
            f"max_points must be >= 2 and num_samples >= 1, got {max_points}, {num_samples}"
        )
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=generator)[:max_points].sort().values
    batch = get_batch(data, index)
    m = index.numel()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        node, _ = trace_guide_site(guide, batch, kwargs, site)
        fn: Any = node["fn"]
        if tuple(fn.batch_shape) != (m,):
            raise ValueError(
                f"site {site!r} has batch shape {tuple(fn.batch_shape)}; mutual_information "
                f"needs one distribution per datapoint, batch shape ({m},), as inside a single "
                "pyro.plate('data', ...)"
            )
        z = fn.sample((num_samples,))  # (S, M, *event)
        base = fn.base_dist if isinstance(fn, Independent) else None
        factorised = base is not None and not base.event_shape and len(fn.event_shape) >= 1
        event_shape = tuple(fn.event_shape)
        axes = channel_layout(channels, site, event_shape)
        if axes is not None and not factorised:
            raise ValueError(
                f"site {site!r}: the guide's distribution does not factorise over its event "
                f"axes {event_shape}, so its mutual information cannot be split per channel"
            )
        joint, per_element = _log_q(fn, base if factorised else None, z, axes)
        estimate, stderr = _mean_and_stderr(_mi_terms(joint))
        per_dim = per_dim_stderr = None
        if per_element is not None:
            per_dim, per_dim_stderr = _mean_and_stderr(_mi_terms(per_element))
            per_dim = per_dim.clamp(min=0.0)
    return MutualInformation(
        site,
        max(float(estimate), 0.0),
        per_dim,
        m,
        stderr=float(stderr),
        estimate=float(estimate),
        per_dim_stderr=per_dim_stderr,
    )


# --------------------------------------------------------------------------------------------
# The report.


@dataclass
class LayerReport:
    """One latent site (layer) of a :class:`CollapseReport`.

    ``kl``: mean KL per dimension ``(D,)``; ``activity``: Var_x E_q[z_d | x] ``(D,)``;
    ``active``: ``activity > activity_threshold``; ``collapsed``: ``kl < kl_threshold`` (the
    posterior of that dimension is the prior, whatever x), and not active when ``conditional``
    (the layer's term is not a KL, :class:`KLPerDim`); ``fraction_below``:
    the share of (datapoint, dimension) pairs with KL < epsilon; ``mutual_information``:
    I(x; z) of the site (None when not computed; ``mutual_information_stderr`` its standard
    error); ``in_use``: active and not collapsed (:attr:`in_use_dims`); ``active_directions``:
    the number of
    directions along which the posterior mean moves with x (:class:`ActiveUnits`), below the
    number of active axes when a rotated layer lost a direction.
    """

    site: str
    kl: torch.Tensor
    activity: torch.Tensor
    active: torch.Tensor
    collapsed: torch.Tensor
    fraction_below: float
    mutual_information: float | None = None
    active_directions: int | None = None
    mutual_information_stderr: float | None = None
    conditional: bool = False
    per_datapoint: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dims(self) -> int:
        return int(self.kl.numel())

    @property
    def collapsed_dims(self) -> list[int]:
        return [int(d) for d in torch.nonzero(self.collapsed).flatten()]

    @property
    def in_use_dims(self) -> list[int]:
        """Dimensions that carry information about x: active and not collapsed."""
        return [int(d) for d in torch.nonzero(self.active & ~self.collapsed).flatten()]

    @property
    def inactive_dims(self) -> list[int]:
        """Dimensions that ignore x without being at the prior (KL spent for nothing)."""
        return [int(d) for d in torch.nonzero(~self.active & ~self.collapsed).flatten()]

    @property
    def lost_directions(self) -> int:
        """Directions of the layer that ignore x though every axis they mix is active."""
        if self.active_directions is None:
            return 0
        return max(0, int(self.active.sum()) - self.active_directions)


@dataclass
class CollapseReport:
    """What :func:`collapse_report` returns: ``layers`` by site name (in layer order), the
    thresholds used, and ``verdict``, a plain-language summary (also ``str(report)``)."""

    layers: dict[str, LayerReport]
    epsilon: float
    kl_threshold: float
    activity_threshold: float
    verdict: str = ""

    def __str__(self) -> str:
        return self.verdict

    @property
    def collapsed(self) -> dict[str, list[int]]:
        """Collapsed dimensions per site."""
        return {name: layer.collapsed_dims for name, layer in self.layers.items()}


def _dims_text(dims: list[int], limit: int = 12) -> str:
    """Names the dimensions: 'dimension 3' or 'dimensions 0, 2, ... (n in all)'."""
    shown = ", ".join(str(d) for d in dims[:limit])
    more = f", ... ({len(dims)} in all)" if len(dims) > limit else ""
    return ("dimension " if len(dims) == 1 else "dimensions ") + shown + more


def _verdict(report: CollapseReport) -> str:
    """The verdict, derived from the numbers it shows: a dimension is *in use* when it is
    active (its posterior mean moves with x) and not collapsed (at the prior)."""
    lines = []
    layers = report.layers.values()
    dims = sum(layer.dims for layer in layers)
    in_use = sum(len(layer.in_use_dims) for layer in layers)
    collapsed_total = sum(len(layer.collapsed_dims) for layer in layers)
    for name, layer in report.layers.items():
        collapsed = layer.collapsed_dims
        head = (
            f"{name}: {len(layer.in_use_dims)} of {layer.dims} dimensions in use (active, not "
            f"at the prior), KL {float(layer.kl.sum()):.3g} nats"
        )
        if layer.mutual_information is not None:
            stderr = layer.mutual_information_stderr or 0.0
            head += f", I(x; {name}) = {layer.mutual_information:.3g} ± {stderr:.2g} nats"
        head += (
            f"; {100 * layer.fraction_below:.1f}% of (datapoint, dimension) pairs have "
            f"KL < {report.epsilon:g}."
        )
        lines.append(head)
        if len(collapsed) == layer.dims:
            lines.append(
                f"  Posterior collapse: every dimension of {name} collapsed to the prior "
                f"(KL < {report.kl_threshold:g}, inactive); the model ignores this layer."
            )
        elif collapsed:
            lines.append(
                f"  Partial collapse: {_dims_text(collapsed)} of {name} collapsed "
                f"to the prior (KL < {report.kl_threshold:g}, inactive)."
            )
        else:
            lines.append(f"  No collapsed dimension in {name}.")
        inactive = layer.inactive_dims
        if inactive:
            lines.append(
                f"  No information about x in {_dims_text(inactive)} of {name} (activity <= "
                f"{report.activity_threshold:g}), yet not at the prior: KL spent for nothing."
            )
        if layer.lost_directions:
            lines.append(
                f"  Rotated collapse: the posterior means of {name} move along only "
                f"{layer.active_directions} directions, though {int(layer.active.sum())} of "
                f"its axes are active; {layer.lost_directions} direction(s) of {name} ignore "
                "x, mixed over the axes."
            )
        low = torch.nonzero(layer.active & (layer.kl < report.kl_threshold)).flatten()
        if layer.conditional and low.numel():
            lines.append(
                f"  Not counted as collapsed: {_dims_text(low.tolist())} of {name}, active "
                f"although the KL term is below {report.kl_threshold:g}. Its prior is "
                "conditioned on latents the guide drew from this layer (bottom-up inference), "
                "so the term is E_q[log q - log p], not a KL."
            )
    unused = dims - in_use - collapsed_total
    if collapsed_total == dims:
        verdict = "Verdict: total posterior collapse; the latents carry no information."
    elif in_use == 0:
        verdict = (
            f"Verdict: no dimension in use; the latents carry no information about x "
            f"({collapsed_total} of {dims} at the prior, {unused} inactive off the prior)."
        )
    elif collapsed_total or any(layer.lost_directions for layer in layers):
        verdict = f"Verdict: partial posterior collapse; {in_use} of {dims} dimensions in use."
    elif unused:
        verdict = (
            f"Verdict: no posterior collapse, but only {in_use} of {dims} dimensions in use; "
            f"{unused} carry no information about x though not at the prior."
        )
    else:
        verdict = f"Verdict: no posterior collapse; all {dims} dimensions in use."
    return "\n".join([verdict, *lines])


def collapse_report(
    model: Callable,
    guide: Callable,
    data: Data,
    sites: str | Sequence[str] | None = None,
    epsilon: float = 0.01,
    kl_threshold: float = 0.01,
    activity_threshold: float = 0.01,
    mutual_info: bool = True,
    max_points: int = 1000,
    batch_size: int = 500,
    num_particles: int = 10,
    analytic: bool = True,
    channels: Mapping[str, Channels] | None = None,
    **kwargs: Any,
) -> CollapseReport:
    """Per layer and dimension: KL, activity, collapse, and a verdict.

    :param model, guide: any pair; per-datapoint latents inside ``pyro.plate("data")``.
    :param data: as for :func:`kl_per_dim`.
    :param sites: a site name, a list of them, or None for every guide latent in the data
        plate, ordered by name with numbers compared as numbers (``z1, z2, ..., z10``).
    :param epsilon: the per-(datapoint, dimension) KL threshold of Dang et al. (0.01).
    :param kl_threshold: a dimension is collapsed when its mean KL is below this (and, for a
        layer whose term is not a KL, its activity at most ``activity_threshold``).
    :param activity_threshold: active-units threshold (0.01, Burda et al.).
    :param mutual_info: also estimate I(x; z) per site (:func:`mutual_information`).
    :param channels: a dimension map ``{site: channel axes}`` (see
        :mod:`pvae.diagnostics.latents`): the named sites are reported per channel, aggregated
        over their other event axes (time); e.g. ``{"z": -1}`` for event shape ``(T, C)``.
    :returns: :class:`CollapseReport`.
    """
    names = [sites] if isinstance(sites, str) else sites
    kls, order = _site_kls(
        model, guide, data, names, batch_size, num_particles, analytic, kwargs, channels
    )
    layers: dict[str, LayerReport] = {}
    for name in order:
        kl = kls[name]
        units: ActiveUnits = active_units(
            guide,
            data,
            site=name,
            threshold=activity_threshold,
            batch_size=batch_size,
            channels=channels,
            **kwargs,
        )
        if units.dims != kl.dims:
            raise ValueError(
                f"site {name!r}: {kl.dims} KL dimensions but {units.dims} activity dimensions"
            )
        mi = None
        if mutual_info:
            try:
                mi = mutual_information(
                    guide, data, site=name, max_points=max_points, channels=channels, **kwargs
                )
            except ValueError:
                mi = None  # a site with extra plates: report without it
        layers[name] = LayerReport(
            site=name,
            kl=kl.kl,
            activity=units.variances,
            active=units.active,
            collapsed=(kl.kl < kl_threshold) & (~units.active if kl.conditional else True),
            fraction_below=kl.fraction_below(epsilon),
            mutual_information=None if mi is None else mi.total,
            mutual_information_stderr=None if mi is None else mi.stderr,
            per_datapoint=kl.per_datapoint,
            active_directions=units.active_directions,
            conditional=kl.conditional,
        )
    report = CollapseReport(layers, float(epsilon), float(kl_threshold), float(activity_threshold))
    report.verdict = _verdict(report)
    return report

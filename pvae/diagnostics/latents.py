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

Channels (a dimension map). A site whose event has more than one axis, such as a sequence
latent with event shape ``(T, C)`` (time, channel), is reported per channel when the map
``channels={"z": -1}`` names its channel axes (event axes, negative from the end or
non-negative from the start of the event; an int, a tuple of ints, or ``"channels_last"`` /
``"channels_first"``). Every other event axis is aggregated:

- KL per dimension (:func:`pvae.diagnostics.kl_per_dim`): summed, KL_c = sum_t KL_tc (the
  channel's share of the site's KL; the channels still add up to the site's KL);
- mutual information: the channel's log-densities are summed over time, I(x; z_{., c});
- activity: the per-step covariances are averaged over time,
  A_c = mean_t Var_x E_q[z_tc | x] (and the directions are the eigenvalues of the
  time-averaged channel covariance).

Sites absent from the map have their event flattened: one "dimension" per event element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pvae.evaluate import Data, as_tensors, iter_batches, num_items
from pvae.protocol import trace_guide_site

__all__ = [
    "ActiveUnits",
    "Channels",
    "active_units",
    "channel_layout",
    "count_active",
    "latent_activity",
    "layer_sites",
    "posterior_mean",
]

Channels = int | Sequence[int] | str
"""The channel axes of one site's event: an int, ints, ``"channels_last"`` or
``"channels_first"``."""


def channel_layout(
    channels: Mapping[str, Channels] | None, site: str, event_shape: Sequence[int]
) -> tuple[int, ...] | None:
    """The non-negative channel axes of ``site``'s event, or None when the map does not name
    the site (then its event is flattened). Raises ValueError for an axis outside the event."""
    if channels is None:
        return None
    if not isinstance(channels, Mapping):
        raise TypeError(
            f"channels must be a mapping from site name to channel axes, got {channels!r}"
        )
    if site not in channels:
        return None
    spec = channels[site]
    ndim = len(event_shape)
    if isinstance(spec, str):
        if spec not in ("channels_last", "channels_first"):
            raise ValueError(
                f"channels[{site!r}] must be an int, ints, 'channels_last' or "
                f"'channels_first', got {spec!r}"
            )
        spec = -1 if spec == "channels_last" else 0
    axes = (spec,) if isinstance(spec, int) else tuple(spec)
    if not axes or not all(isinstance(a, int) and -ndim <= a < ndim for a in axes):
        raise ValueError(
            f"channels[{site!r}] = {channels[site]!r} names no axis of the site's event of "
            f"shape {tuple(event_shape)}"
        )
    normal = tuple(sorted({a % ndim for a in axes}))
    if len(normal) != len(axes):
        raise ValueError(f"channels[{site!r}] = {channels[site]!r} repeats an axis")
    return normal


def to_channels(
    values: torch.Tensor, event_shape: Sequence[int], axes: tuple[int, ...] | None
) -> torch.Tensor:
    """``(..., *event)`` -> ``(..., A, C)``: the aggregated axes (A of them multiplied out;
    1 when there are none) before the channels (C, flattened). ``axes=None``: ``(..., 1, D)``.
    """
    ndim = len(event_shape)
    lead = values.shape[: values.dim() - ndim]
    if axes is None:
        return values.reshape(lead + (1, -1))
    start = len(lead)
    others = [a for a in range(ndim) if a not in axes]
    order = list(range(start)) + [start + a for a in others] + [start + a for a in axes]
    size_c = math.prod(event_shape[a] for a in axes)
    return values.permute(order).reshape(lead + (-1, size_c))


def _site_mean(fn: Any, num_samples: int) -> torch.Tensor:
    """The mean of a site's distribution (the average of draws when not finite in closed form)."""
    try:
        mean = fn.mean
    except (NotImplementedError, AttributeError):
        mean = None
    if mean is None or not torch.isfinite(mean).all():  # e.g. Cauchy: fall back to samples
        mean = fn.sample((num_samples,)).mean(0)
    return mean


def _mean_runs(
    guide: Callable, args: tuple, kwargs: dict, site: str, num_runs: int, num_samples: int
) -> torch.Tensor:
    """E_q[site | args] from each of the runs of the guide, ``(runs, batch, *event)``: one
    run when no latent is sampled before ``site``, else ``num_runs`` runs."""
    node, upstream = trace_guide_site(guide, args, kwargs, site)
    runs = num_runs if upstream else 1
    draws = []
    for run in range(runs):
        if run:
            node, _ = trace_guide_site(guide, args, kwargs, site)
        draws.append(_site_mean(node["fn"], num_samples))
    return torch.stack(draws)


def posterior_mean(
    guide: Callable,
    args: tuple | torch.Tensor,
    site: str = "z",
    num_runs: int = 32,
    num_samples: int = 64,
    **kwargs: Any,
) -> torch.Tensor:
    """E_q[site | x] for a batch: the mean of the site's guide distribution.

    :param guide: any guide; run as ``guide(*args, **kwargs)`` without gradients, leaving the
        global random state as it was.
    :param args: the guide's positional arguments (a tensor is one argument).
    :param site: the latent site.
    :param num_runs: when the guide samples other latents before ``site`` (an upper layer of a
        bottom-up guide), the mean given those draws is averaged over this many guide runs.
    :param num_samples: draws averaged when the distribution has no finite ``.mean``.
    :returns: the site's mean, its distribution's shape (``(batch, *event)`` in a data plate).
    """
    if num_runs < 1 or num_samples < 1:
        raise ValueError(f"num_runs and num_samples must be >= 1, got {num_runs}, {num_samples}")
    batch = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return _mean_runs(guide, batch, kwargs, site, num_runs, num_samples).mean(0)


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


def active_units(
    guide: Callable,
    data: Data,
    site: str = "z",
    threshold: float = 0.01,
    batch_size: int = 500,
    num_samples: int = 16,
    num_runs: int = 32,
    channels: Mapping[str, Channels] | None = None,
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
    steps = 1
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in iter_batches(data, batch_size):
            stacked_runs = _mean_runs(guide, batch, kwargs, site, num_runs, num_samples)
            runs, rows = stacked_runs.shape[0], batch[0].shape[0]
            if stacked_runs.dim() < 2 or stacked_runs.shape[1] != rows:
                raise ValueError(
                    f"site {site!r} has a mean of shape {tuple(stacked_runs.shape[1:])}; "
                    f"active_units needs one row per datapoint ({rows} in this batch), as "
                    "inside pyro.plate('data', ...)"
                )
            event_shape = stacked_runs.shape[2:]
            axes = channel_layout(channels, site, event_shape)
            grouped = to_channels(stacked_runs.double(), event_shape, axes)  # (runs, rows, A, C)
            steps = grouped.shape[2]
            average = grouped.mean(0)
            if runs > 1:
                spread = grouped - average
                within = within + torch.einsum("srad,srae->de", spread, spread) / (runs - 1)
            means.append(average)
    stacked = torch.cat(means)  # (N, A, C)
    dims = stacked.shape[-1]
    centred = stacked - stacked.mean(0)
    covariance = torch.einsum("nad,nae->de", centred, centred) / ((n - 1) * steps)
    covariance = covariance.reshape(dims, dims) - within / (n * runs * steps)
    variances = covariance.diagonal().clamp(min=0.0)
    active = variances > threshold
    directions = torch.linalg.eigvalsh(covariance).flip(0).clamp(min=0.0)
    return ActiveUnits(int(active.sum()), variances, active, float(threshold), directions)


def layer_sites(model: Any) -> tuple[str, ...]:
    """The names of a model's per-datapoint latent layers: its ``layer_sites`` where it has
    them (a hierarchical VAE: ``("z1", "z2")``), else ``("z",)``."""
    return tuple(getattr(model, "layer_sites", ("z",)))


def latent_activity(
    model: Any,
    test: Data,
    seed: int,
    num_points: int | None = None,
    channels: Mapping[str, Any] | None = None,
) -> dict[str, ActiveUnits]:
    """:func:`active_units` (threshold 0.01, Burda et al.) of ``model.guide`` at each site of
    :func:`layer_sites`, on the first ``num_points`` rows of ``test`` (all when None),
    each site seeded with ``seed``; the global random state is left as found.

    :param test: ``(N, x_dim)``, or a tuple of tensors with ``N`` rows each (passed to the
        guide as its arguments).
    :param channels: the model's dimension map (site -> channel layout, see
        :func:`channel_layout`): those sites are counted per channel.
    :returns: site -> :class:`ActiveUnits`; :func:`count_active` sums them.
    """
    tensors = as_tensors(test)
    if num_points is not None:
        tensors = tuple(t[:num_points] for t in tensors)
    batch: Any = tensors if len(tensors) > 1 else tensors[0]
    with torch.random.fork_rng(devices=[]):
        result = {}
        for site in layer_sites(model):
            torch.manual_seed(seed)
            result[site] = active_units(model.guide, batch, site=site, channels=channels)
    return result


def count_active(activity: Mapping[str, ActiveUnits]) -> tuple[int, int]:
    """``(active units, latent dimensions)`` summed over the layers of
    :func:`latent_activity`."""
    return (
        sum(units.count for units in activity.values()),
        sum(units.dims for units in activity.values()),
    )

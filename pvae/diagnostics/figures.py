"""Matplotlib figures of the latent diagnostics: KL per dimension, activity, the relevance
curve, latent traversals, posterior paths per latent channel, and the distance curves of a
prior selection. As in
:mod:`pvae.plots`: no ``pyplot``, each function returns a :class:`matplotlib.figure.Figure`
and, given ``path``, saves it atomically.

The figures stay legible from 2 to a few tens of latent dimensions: bar panels widen with the
number of dimensions (up to 10 inches) and label every dimension while the labels fit, else
every 2nd, 5th, 10th ... (every dimension keeps a minor tick); per-channel paths are laid out
in a grid with shared axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pvae.diagnostics.collapse import CollapseReport, KLPerDim
from pvae.diagnostics.latents import ActiveUnits
from pvae.diagnostics.relevance import LatentRelevance
from pvae.plots import PathLike, image_grid, save
from pvae.protocol import trace_guide_site

__all__ = [
    "activity_bars",
    "kl_bars",
    "path_grid",
    "posterior_paths",
    "relevance_curve",
    "selection_curves",
    "traversals",
]


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save(fig, path)
    return fig


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy().reshape(-1)


def _layers(
    source: KLPerDim | CollapseReport | Mapping[str, torch.Tensor] | torch.Tensor, attr: str
) -> dict[str, np.ndarray]:
    if isinstance(source, CollapseReport):
        return {name: _numpy(getattr(layer, attr)) for name, layer in source.layers.items()}
    if isinstance(source, KLPerDim):
        return {source.site: _numpy(source.kl)}
    if isinstance(source, ActiveUnits):
        return {"z": _numpy(source.variances)}
    if isinstance(source, torch.Tensor):
        return {"z": _numpy(source)}
    return {name: _numpy(value) for name, value in source.items()}


#: Tick label font size (points) of the per-dimension axes; a label of n digits is about
#: ``0.6 * n`` of it wide.
TICK_FONT = 7.0
_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _panel_width(count: int) -> float:
    """Inches for a panel of ``count`` bars: 0.2 per bar plus margins, 3.2 to 10."""
    return min(10.0, max(3.2, 0.2 * count + 1.2))


def _label_step(count: int, inches: float, digits: int | None = None) -> int:
    """The step (1, 2, 5, 10, ...) between labelled ticks so that ``count`` labels of
    ``digits`` characters (default: those of ``count - 1``) fit side by side in ``inches``
    (each label's width plus a gap of half the font size)."""
    digits = digits if digits is not None else len(str(max(count - 1, 0)))
    per_label = (0.6 * digits + 0.5) * TICK_FONT / 72.0
    fit = max(1, int(inches / per_label))
    return next((step for step in _STEPS if math.ceil(count / step) <= fit), _STEPS[-1])


def _dimension_ticks(ax: Axes, labels: Sequence[str], inches: float, rotate: bool = False) -> None:
    """A minor tick at every bar ``0 .. len(labels) - 1`` and a labelled major tick at every
    step-th (:func:`_label_step`); ``rotate`` turns the labels upright (then only their
    height, one font size, must fit)."""
    count = len(labels)
    positions = np.arange(count)
    digits = 1 if rotate else max((len(label) for label in labels), default=1)
    step = _label_step(count, inches, digits)
    ax.set_xticks(positions, minor=True)
    ax.set_xticks(positions[::step], [labels[i] for i in positions[::step]])
    ax.tick_params(axis="x", labelsize=TICK_FONT, labelrotation=90 if rotate else 0)


def _bars(
    values: dict[str, np.ndarray], threshold: float, ylabel: str, title: str, log: bool
) -> Figure:
    if not values:
        raise ValueError("nothing to plot: no latent site given")
    widths = [_panel_width(v.size) for v in values.values()]
    fig = Figure(figsize=(sum(widths) + 1.4, 3.0), layout="constrained")
    axes = fig.subplots(1, len(values), squeeze=False, width_ratios=widths)[0]
    for ax, width, (name, v) in zip(axes, widths, values.items(), strict=True):
        dims = np.arange(v.size)
        below = v < threshold
        ax.bar(dims, v, color=np.where(below, "tab:gray", "tab:blue"))
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
        if log:
            ax.set_yscale("symlog", linthresh=max(threshold, 1e-6))
        ax.set_xlabel(f"dimension of {name}")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}", fontsize=10)
        ax.set_xlim(-0.6, v.size - 0.4)
        _dimension_ticks(ax, [str(d) for d in dims], width - 0.9)
    handles = [
        Patch(color="tab:blue", label="above threshold"),
        Patch(color="tab:gray", label="below threshold"),
        Line2D([], [], color="tab:red", linestyle="--", linewidth=1, label=f"{threshold:g}"),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def kl_bars(
    source: KLPerDim | CollapseReport | Mapping[str, torch.Tensor] | torch.Tensor,
    threshold: float = 0.01,
    log: bool = False,
    path: PathLike | None = None,
) -> Figure:
    """Bars of E_x KL(q(z_d|x) || p(z_d)) per dimension (one panel per layer), with the
    collapse threshold as a dashed line; dimensions below it are grey.

    :param source: a :class:`KLPerDim`, a :class:`CollapseReport`, ``{site: (D,)}`` or ``(D,)``.
    """
    return _finish(_bars(_layers(source, "kl"), threshold, "KL (nats)", "KL", log), path)


def activity_bars(
    source: ActiveUnits | CollapseReport | Mapping[str, torch.Tensor] | torch.Tensor,
    threshold: float = 0.01,
    log: bool = True,
    path: PathLike | None = None,
) -> Figure:
    """Bars of Var_x E_q[z_d | x] per dimension (one panel per layer), with the active-units
    threshold as a dashed line.

    :param source: an :class:`ActiveUnits`, a :class:`CollapseReport`, ``{site: (D,)}`` or
        ``(D,)``.
    """
    values = _layers(source, "activity")  # type: ignore[arg-type]
    if isinstance(source, ActiveUnits):
        threshold = source.threshold
    elif isinstance(source, CollapseReport):
        threshold = source.activity_threshold
    return _finish(_bars(values, threshold, "Var_x E[z_d | x]", "activity", log), path)


def relevance_curve(result: LatentRelevance, path: PathLike | None = None) -> Figure:
    """Left: relevance scores in ranking order (relevant dimensions highlighted, each bar
    labelled with its dimension while the labels fit); right: the cumulative share of the
    total score, with the threshold (99%) line and the size of the relevant set marked."""
    scores = _numpy(result.scores)[result.ranking]
    cumulative = _numpy(result.cumulative)
    k = result.num_relevant
    positions = np.arange(scores.size)
    width = _panel_width(scores.size)
    fig = Figure(figsize=(width + 4.0, 3.0), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[width, 4.0])
    colours = ["tab:blue" if i < k else "tab:gray" for i in range(scores.size)]
    left.bar(positions, scores, color=colours)
    left.set_xlim(-0.6, scores.size - 0.4)
    _dimension_ticks(left, [str(d) for d in result.ranking], width - 0.9)
    left.set_xlabel("latent dimension (by decreasing score)")
    left.set_ylabel("relevance score")
    left.set_title(f"{k} relevant of {scores.size}", fontsize=10)
    right.plot(positions + 1, cumulative, marker="o", markersize=4, color="tab:blue")
    right.axhline(
        result.threshold,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"{100 * result.threshold:g}%",
    )
    if k:
        right.axvline(k, color="tab:gray", linestyle=":", linewidth=1, label=f"{k} dims")
    right.set_ylim(0, 1.05)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("number of dimensions")
    right.set_ylabel("cumulative share of score")
    right.legend(fontsize=8)
    return _finish(fig, path)


def _grid_shape(count: int) -> tuple[int, int]:
    """``(rows, columns)`` for ``count`` panels: between sqrt(count) and sqrt(2 count)
    columns, the fewest empty cells, then the most columns (2 -> 1x2, 7 -> 2x4, 20 -> 4x5,
    40 -> 5x8)."""
    low = max(1, math.ceil(math.sqrt(count)))
    high = max(low, math.ceil(math.sqrt(2 * count)))
    columns = min(range(low, high + 1), key=lambda c: (math.ceil(count / c) * c - count, -c))
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def path_grid(
    mean: torch.Tensor | np.ndarray,
    sd: torch.Tensor | np.ndarray | None = None,
    site: str = "z",
    path: PathLike | None = None,
) -> Figure:
    """One small panel per latent channel c: the posterior mean ``mean[:, c]`` over the steps
    t with a band of ±2 ``sd[:, c]``, in a grid (:func:`_grid_shape`) whose panels share both
    axes (so channels compare at a glance: a collapsed one is a flat line in a band of ±2).

    :param mean: ``(T, C)`` posterior means of one sequence.
    :param sd: ``(T, C)`` posterior standard deviations, or None (no band).
    """
    mean_np = mean.detach().cpu().double().numpy() if isinstance(mean, torch.Tensor) else mean
    mean_np = np.asarray(mean_np, dtype=np.float64)
    if mean_np.ndim != 2:
        raise ValueError(f"mean must have shape (T, C), got {mean_np.shape}")
    if sd is None:
        sd_np = np.zeros_like(mean_np)
    else:
        sd_np = np.asarray(
            sd.detach().cpu().double().numpy() if isinstance(sd, torch.Tensor) else sd, float
        )
    if sd_np.shape != mean_np.shape:
        raise ValueError(f"sd must have the shape of mean {mean_np.shape}, got {sd_np.shape}")
    steps, count = mean_np.shape
    rows, columns = _grid_shape(count)
    # fixed margins in inches (a constrained layout of 40 panels takes seconds to draw):
    # panels 1.75 to 3.2 inches wide (about 13 inches in all), 0.6 as tall; gaps for the
    # tick labels (left, bottom) and the titles (top)
    panel = min(3.2, max(1.75, 13.0 / columns))
    width, height = 0.75 + (panel + 0.15) * columns, 0.55 + (0.6 * panel + 0.4) * rows
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=0.7 / width,
        right=1 - 0.05 / width,
        bottom=0.5 / height,
        top=1 - 0.25 / height,
        wspace=0.15 / panel,
        hspace=0.4 / (0.6 * panel),
    )
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    t = np.arange(steps)
    for c, ax in enumerate(axes.flat):
        if c >= count:
            ax.set_axis_off()
            continue
        if c + columns >= count:  # nothing drawn below: this panel shows the step labels
            ax.tick_params(labelbottom=True)
        ax.plot(t, mean_np[:, c], color="C0", linewidth=1)
        band = 2 * sd_np[:, c]
        ax.fill_between(t, mean_np[:, c] - band, mean_np[:, c] + band, alpha=0.3, linewidth=0)
        ax.set_title(f"channel {c}", fontsize=8, pad=2)
        ax.tick_params(labelsize=TICK_FONT)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.grid(alpha=0.3)
    fig.supxlabel("step t", fontsize=9, y=0.05 / height, va="bottom")
    fig.supylabel(f"E_q[{site}_t | x] ± 2 sd", fontsize=9, x=0.05 / width, ha="left")
    return _finish(fig, path)


def traversals(
    decode: Callable[[torch.Tensor], torch.Tensor],
    mu: torch.Tensor,
    dims: Sequence[int],
    image_shape: Sequence[int] | None = None,
    path: PathLike | None = None,
    span: float = 3.0,
    steps: int = 9,
) -> Figure:
    """Latent traversals: the decoded means as each dimension d of ``dims`` moves over
    ``mu_d + linspace(-span, span, steps)`` with the other dimensions held at ``mu``.

    :param decode: ``decode(z) -> x_hat``, the mean of p(x | z), ``(steps, D) -> (steps, ...)``.
    :param mu: ``(D,)`` (or any shape of D elements), e.g. the posterior mean of one point.
    :param image_shape: ``x_hat``'s image shape: an image grid, one row per dimension, one
        column per step; None: one panel per dimension, one line per observed element.
    """
    offsets = torch.linspace(-span, span, steps)
    rows = []
    for d in dims:
        z = mu.reshape(1, -1).repeat(steps, 1)
        z[:, d] = z[:, d] + offsets
        with torch.no_grad():
            rows.append(decode(z).reshape(steps, -1))
    title = (
        f"rows: dimensions {', '.join(map(str, dims))} by relevance; columns: "
        f"mu_d {-span:+g} ... mu_d {span:+g}"
    )
    if image_shape is not None:
        return image_grid(torch.cat(rows), image_shape, nrow=steps, title=title, path=path)
    fig = Figure(figsize=(max(4.0, 3.6 * len(dims)), 3.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(dims)), squeeze=False)[0]
    for ax, d, decoded in zip(axes, dims, rows, strict=False):
        values = decoded.detach().cpu().double().numpy()
        for column in range(values.shape[1]):
            ax.plot(offsets.numpy(), values[:, column], marker=".", label=f"x[{column}]")
        ax.set_xlabel(f"z[{d}] - posterior mean")
        ax.set_ylabel("decoded mean of x")
        ax.set_title(f"dimension {d}", fontsize=10)
        if values.shape[1] <= 10:
            ax.legend(fontsize=7)
    return _finish(fig, path)


def posterior_paths(
    guide: Callable,
    batch: tuple,
    site: str = "z",
    channels_first: bool = False,
    path: PathLike | None = None,
) -> Figure | None:
    """:func:`path_grid` of the posterior of ``site`` for the first sequence of ``batch``
    (the guide's arguments): its mean ``(T, C)`` (``(C, T)`` when ``channels_first``) over the
    steps with a band of ±2 posterior standard deviations (none where the distribution has no
    variance); None when the site's event is not two-dimensional. The global RNG is untouched.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        node, _ = trace_guide_site(guide, batch, {}, site)
        fn: Any = node["fn"]
        mean = fn.mean[0]
        try:
            sd = fn.variance[0].clamp(min=0).sqrt()
        except (NotImplementedError, AttributeError):
            sd = torch.zeros_like(mean)
    if mean.dim() != 2:
        return None
    if channels_first:
        mean, sd = mean.mT, sd.mT
    return path_grid(mean, sd, site, path)


def _selection_points(selection: Any) -> tuple[list[Any], np.ndarray]:
    """``(candidates, distances)`` of a ``PriorSelection``, a recorded
    ``{"candidates": ..., "distances": ...}`` or a pair."""
    if isinstance(selection, Mapping):
        candidates, distances = selection.get("candidates"), selection.get("distances")
    elif isinstance(selection, tuple | list) and len(selection) == 2:
        candidates, distances = selection
    else:
        candidates = getattr(selection, "candidates", None)
        distances = getattr(selection, "distances", None)
    if candidates is None or distances is None or len(candidates) != len(distances):
        raise ValueError(
            "each selection must give as many candidates as distances (a PriorSelection, "
            f"a dict with 'candidates' and 'distances', or a pair), got {selection!r}"
        )
    if not len(candidates):
        raise ValueError("a selection must hold at least one candidate")
    return list(candidates), np.asarray([float(d) for d in distances], dtype=np.float64)


def selection_curves(
    selections: Mapping[str, Any],
    xlabel: str = "prior scale s",
    path: PathLike | None = None,
) -> Figure:
    """The distance of every candidate to the data, one panel per metric, each on its own y
    axis (SW and DSWD differ in scale), with the minimum, the candidate chosen, marked and
    written in the panel's title; a log x axis when every candidate is a positive number
    (prior scales), else the candidates as category labels.

    :param selections: ``metric -> selection``, a selection being what
        ``BayesianAE.select_prior`` returns, the ``prior_selection`` a ``pvae sample`` run
        records (``candidates`` and ``distances``), or a pair ``(candidates, distances)``.
    """
    if not selections:
        raise ValueError("nothing to plot: selections is empty")
    points = {str(metric): _selection_points(item) for metric, item in selections.items()}
    fig = Figure(figsize=(3.6 * len(points) + 0.4, 3.0), layout="constrained")
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    for index, (ax, (metric, (candidates, distances))) in enumerate(
        zip(axes, points.items(), strict=True)
    ):
        scales = all(isinstance(c, int | float) and c > 0 for c in candidates)
        xs = np.asarray(candidates, dtype=np.float64) if scales else np.arange(len(candidates))
        ax.plot(xs, distances, marker="o", color=f"C{index % 10}")
        finite = np.isfinite(distances)
        if finite.any():
            best = int(np.nanargmin(np.where(finite, distances, np.nan)))
            ax.plot(
                xs[best],
                distances[best],
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label=f"minimum: {candidates[best]}",
            )
            ax.legend(fontsize=8)
            ax.set_title(f"{metric.upper()}: minimum at {candidates[best]}", fontsize=10)
        else:
            ax.set_title(f"{metric.upper()}: no finite distance", fontsize=10)
        if scales:
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{c:g}" for c in candidates])
            ax.minorticks_off()
        else:
            ax.set_xticks(xs, [str(c) for c in candidates], rotation=30)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric.upper()} to the data")
        ax.grid(alpha=0.3)
    return _finish(fig, path)

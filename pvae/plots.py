"""Matplotlib figures: learning curves, image grids, reconstructions, samples and side-by-side
comparisons of estimates with error bars; and the atomic file writer every output uses.

Every function builds a :class:`matplotlib.figure.Figure` without ``pyplot`` (so it is safe
under the Agg backend, in threads and in scripts, and leaves no figure open), returns it, and
saves it when given ``path``. Saving is atomic: the figure is written to a temporary file in
the same folder and renamed over ``path``, so a crash never leaves a half-written image. The
format follows ``path``'s suffix (``.png``, ``.pdf``, ``.svg`` ...).

In a notebook a returned figure displays itself (``%matplotlib inline``).

Data that are not images (``image_shape=None``) are drawn as scatter plots of their first
two dimensions (a histogram when there is one).

:func:`write_atomic` and :func:`write_json` give text and JSON files the same guarantee, so a
run folder (``pvae train``, ``pvae compare``) never holds a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pvae.atomic import atomic_write, write_text

if TYPE_CHECKING:
    from pvae.sampling import Posterior

__all__ = [
    "comparison",
    "image_grid",
    "learning_curve",
    "log_joint_trace",
    "reconstructions",
    "samples",
    "save",
    "write_atomic",
    "write_json",
]

PathLike = str | os.PathLike[str]
History = Sequence[Mapping[str, Any]]


def save(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` atomically (temporary file in the same folder, then rename).

    The parent folder is created if needed. Returns the path.
    """
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(
        path, lambda stream: fig.savefig(stream, format=suffix, dpi=dpi, bbox_inches="tight")
    )


def write_atomic(path: PathLike, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8, or bytes) to ``path`` atomically
    (:func:`pvae.atomic.write_text`)."""
    return write_text(path, content)


def json_safe(value: Any) -> Any:
    """JSON-safe numbers, recursively: NaN and infinities become None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (NaN and infinities as null), written atomically."""
    return write_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save(fig, path)
    return fig


def _as_array(x: torch.Tensor | np.ndarray | Sequence[Any], name: str) -> np.ndarray:
    """``x`` as a 2-D float array ``(N, D)`` (a 1-D input is one row)."""
    if isinstance(x, torch.Tensor):
        array = x.detach().cpu().double().numpy()
    else:
        array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, x_dim), got {array.shape}")
    return array


# ---------------------------------------------------------------------------------------------
# Learning curves
# ---------------------------------------------------------------------------------------------


def _history(value: Any) -> History:
    """A history list from a history, a ``pvae.Run`` or a ``run.json``-like dict."""
    if hasattr(value, "history"):
        return value.history
    if isinstance(value, Mapping) and "history" in value:
        return value["history"]
    return value


def learning_curve(
    history_or_runs: History | Any | Mapping[str, History | Any],
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Train (solid) and valid (dashed) bound per epoch, in nats per datapoint.

    :param history_or_runs: one run (``run.history``, a list of per-epoch dicts with
        ``epoch``, ``train_bound`` and ``valid_bound``, or the :class:`pvae.Run` itself), or a
        dict ``name -> history or Run`` to overlay several runs, one colour per name.
    :param path: where to save the figure (atomically), or None.
    """
    runs: dict[str, History]
    if isinstance(history_or_runs, Mapping) and "history" not in history_or_runs:
        runs = {str(name): _history(value) for name, value in history_or_runs.items()}
    else:
        runs = {"": _history(history_or_runs)}
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    drawn = False
    for index, (name, history) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        epochs = [int(record["epoch"]) + 1 for record in history]
        for key, style, label in (
            ("train_bound", "-", "train"),
            ("valid_bound", "--", "valid"),
        ):
            points = [
                (epoch, float(record[key]))
                for epoch, record in zip(epochs, history, strict=True)
                if record.get(key) is not None and math.isfinite(float(record[key]))
            ]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                style,
                color=colour,
                marker="o",
                markersize=3,
                label=f"{name} {label}".strip(),
            )
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound (nats per datapoint)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def _epoch_values(history: History, key: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for record in history:
        value = record.get(key)
        if value is not None and math.isfinite(float(value)):
            values[int(record["epoch"]) + 1] = float(value)
    return values


def _draw_over_seeds(ax: Axes, histories: Sequence[History], key: str, **style: Any) -> bool:
    """The mean over ``histories`` (runs with different seeds) of ``key`` per epoch as a line,
    with every run as a faint line when there are several. Returns whether anything was drawn."""
    curves = [_epoch_values(history, key) for history in histories]
    epochs = sorted({epoch for curve in curves for epoch in curve})
    if not epochs:
        return False
    means = [float(np.mean([c[e] for c in curves if e in c])) for e in epochs]
    line = ax.plot(epochs, means, marker="o", markersize=3, **style)[0]
    if len(curves) > 1:
        for curve in curves:
            xs = sorted(curve)
            ax.plot(
                xs,
                [curve[x] for x in xs],
                style.get("linestyle", "-"),
                color=line.get_color(),
                alpha=0.25,
                linewidth=0.8,
            )
    return True


def compared_learning_curves(
    runs: Mapping[str, Sequence[History]],
    yardstick: str | None,
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Learning curves of several bounds: left, the common yardstick (the same estimator for
    every bound, ``record["yardstick"]``, e.g. IWAE-64 on validation points) per epoch on one
    axis; right, each bound's own objective (train solid, valid dashed). With several runs
    per bound (seeds) the line is their mean and each run is drawn faintly.

    :param runs: ``bound -> [history, ...]`` (one history per seed; a history is a list of
        per-epoch dicts with ``epoch``, ``train_bound``, ``valid_bound``, ``yardstick``).
    :param yardstick: the yardstick's name for the axis label (None: no yardstick panel
        content).
    :param path: where to save the figure (atomically), or None.
    """
    fig = Figure(figsize=(11.0, 4.2))
    common, own = fig.subplots(1, 2)
    drawn_common = drawn_own = False
    for index, (name, histories) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        histories = [_history(history) for history in histories]
        drawn_common |= _draw_over_seeds(common, histories, "yardstick", color=colour, label=name)
        drawn_own |= _draw_over_seeds(
            own, histories, "train_bound", color=colour, label=f"{name} train"
        )
        drawn_own |= _draw_over_seeds(
            own, histories, "valid_bound", color=colour, linestyle="--", label=f"{name} valid"
        )
    for ax, drawn, label, empty in (
        (
            common,
            drawn_common,
            f"{yardstick} on validation points (nats)" if yardstick else "yardstick",
            "no yardstick recorded",
        ),
        (own, drawn_own, "own objective (nats per datapoint)", "no epochs recorded"),
    ):
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    common.set_title("the same estimator for every bound", fontsize="medium")
    own.set_title("each bound's own objective", fontsize="medium")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def ll_vs_k(
    curves: Mapping[str, Mapping[int, float]],
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Importance-sampled log p(x) against the number of samples K (log x axis), one line per
    trained model: where the estimates stop rising, K is large enough (the estimate is a
    lower bound in expectation, non-decreasing in K, Burda et al. 2016).

    :param curves: ``name -> {K: mean log p(x) in nats}``.
    :param path: where to save the figure (atomically), or None.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    drawn = False
    for index, (name, curve) in enumerate(curves.items()):
        points = sorted((int(k), float(v)) for k, v in curve.items() if math.isfinite(float(v)))
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, color=f"C{index % 10}", label=name)
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no estimates", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("importance samples K")
    ax.set_ylabel("log p(x) (nats per datapoint)")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _value_range(*arrays: np.ndarray) -> tuple[float, float]:
    """``(0, 1)`` when every value lies there (grey levels, probabilities), else min/max."""
    values = np.concatenate([a.ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _tile(
    images: np.ndarray, image_shape: Sequence[int], nrow: int, pad_value: float
) -> np.ndarray:
    """``(N, x_dim)`` -> one ``(rows*(H+1)-1, nrow*(W+1)-1[, 3])`` mosaic, 1-pixel gaps."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or math.prod(shape) != images.shape[1]:
        raise ValueError(
            f"image_shape {tuple(image_shape)} does not match x_dim {images.shape[1]}: "
            "expected (channels, height, width) with channels * height * width == x_dim"
        )
    channels, height, width = shape
    pictures = images.reshape(-1, channels, height, width)
    if channels == 3:
        pictures = pictures.transpose(0, 2, 3, 1)  # RGB
    else:
        pictures = pictures[:, 0]  # grey (other channel counts: the first channel)
    count = pictures.shape[0]
    columns = max(1, min(nrow, count))
    rows = max(1, -(-count // columns))
    grid = np.full(
        (rows * (height + 1) - 1, columns * (width + 1) - 1, *pictures.shape[3:]), pad_value
    )
    for index in range(count):
        r, c = divmod(index, columns)
        grid[
            r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width
        ] = pictures[index]
    return grid


def _show(ax: Axes, mosaic: np.ndarray, value_range: tuple[float, float]) -> None:
    low, high = value_range
    if mosaic.ndim == 3:  # RGB: imshow needs [0, 1]
        ax.imshow(np.clip((mosaic - low) / (high - low), 0.0, 1.0), interpolation="nearest")
    else:
        ax.imshow(mosaic, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    ax.set_axis_off()


def _figure_for(mosaic_shape: tuple[int, ...]) -> Figure:
    """A figure whose aspect ratio is the mosaic's, 3 to 10 inches wide."""
    height, width = mosaic_shape[:2]
    inches_wide = min(10.0, max(3.0, width / 15))
    return Figure(figsize=(inches_wide, inches_wide * height / width + 0.4))


def image_grid(
    images: torch.Tensor | np.ndarray,
    image_shape: Sequence[int] | None,
    nrow: int = 8,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """A mosaic of images.

    :param images: ``(N, x_dim)`` flattened images (values in [0, 1] are drawn on a fixed
        0-1 grey scale; other values are scaled to their min and max).
    :param image_shape: ``(channels, height, width)`` (or ``(height, width)``); one channel
        is drawn in grey, three as RGB. None draws a scatter of the first two dimensions.
    :param nrow: images per row of the mosaic.
    :param path: where to save the figure (atomically), or None.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    array = _as_array(images, "images")
    if image_shape is None:
        fig = Figure(figsize=(4.8, 4.4))
        ax = fig.add_subplot()
        _scatter(ax, array, "data", "C0")
        if title:
            ax.set_title(title)
        return _finish(fig, path)
    value_range = _value_range(array)
    mosaic = _tile(array, image_shape, nrow, pad_value=value_range[1])
    fig = _figure_for(mosaic.shape)
    ax = fig.add_subplot()
    _show(ax, mosaic, value_range)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Non-image data
# ---------------------------------------------------------------------------------------------


def _scatter(ax: Axes, array: np.ndarray, label: str, colour: str, **kw: Any) -> None:
    """First two dimensions as a scatter; one dimension as a histogram."""
    if array.shape[1] >= 2:
        ax.scatter(array[:, 0], array[:, 1], s=10, color=colour, label=label, **kw)
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
    else:
        ax.hist(array[:, 0], bins="auto", color=colour, alpha=0.6, label=label)
        ax.set_xlabel("x[0]")
        ax.set_ylabel("count")
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------
# Reconstructions and samples
# ---------------------------------------------------------------------------------------------


def reconstructions(
    x: torch.Tensor | np.ndarray,
    x_hat: torch.Tensor | np.ndarray,
    image_shape: Sequence[int] | None,
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Originals over their reconstructions.

    :param x: ``(N, x_dim)`` data.
    :param x_hat: ``(N, x_dim)`` reconstructions, e.g. ``vae.reconstruct(x)``.
    :param image_shape: ``(channels, height, width)``: the originals make the top row of
        the mosaic and the reconstructions the bottom one, on a shared grey scale. None: a
        scatter of the first two dimensions, each original joined to its reconstruction.
    :param path: where to save the figure (atomically), or None.
    """
    originals, rebuilt = _as_array(x, "x"), _as_array(x_hat, "x_hat")
    if originals.shape != rebuilt.shape:
        raise ValueError(
            f"x and x_hat must have the same shape, got {originals.shape} and {rebuilt.shape}"
        )
    if image_shape is None:
        fig = Figure(figsize=(4.8, 4.4))
        ax = fig.add_subplot()
        if originals.shape[1] >= 2:
            for a, b in zip(originals[:, :2], rebuilt[:, :2], strict=True):
                ax.plot([a[0], b[0]], [a[1], b[1]], color="0.7", linewidth=0.6, zorder=0)
        _scatter(ax, originals, "original", "C0")
        _scatter(ax, rebuilt, "reconstruction", "C1", marker="x")
        ax.legend(fontsize="small")
        ax.set_title("originals and reconstructions" if title is None else title, fontsize=9)
        return _finish(fig, path)
    value_range = _value_range(originals, rebuilt)
    count = originals.shape[0]
    both = np.concatenate([originals, rebuilt])
    mosaic = _tile(both, image_shape, max(1, count), pad_value=value_range[1])
    fig = _figure_for(mosaic.shape)
    ax = fig.add_subplot()
    _show(ax, mosaic, value_range)
    ax.set_title(
        "originals (top) and reconstructions (bottom)" if title is None else title, fontsize=9
    )
    return _finish(fig, path)


def samples(
    x: torch.Tensor | np.ndarray,
    image_shape: Sequence[int] | None,
    path: PathLike | None = None,
    nrow: int | None = None,
    title: str = "samples from the model",
    data: torch.Tensor | np.ndarray | None = None,
) -> Figure:
    """Samples from a model, e.g. ``vae.sample(64)``.

    :param x: ``(N, x_dim)`` samples.
    :param image_shape: ``(channels, height, width)`` for a mosaic (``nrow`` per row, about
        square by default); None for a scatter of the first two dimensions.
    :param data: optional real data ``(M, x_dim)`` drawn behind the samples of a scatter, for
        comparison (ignored for images).
    :param path: where to save the figure (atomically), or None.
    """
    array = _as_array(x, "x")
    if image_shape is not None:
        per_row = nrow if nrow is not None else max(1, math.ceil(math.sqrt(array.shape[0])))
        return image_grid(array, image_shape, nrow=per_row, title=title, path=path)
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    if data is not None:
        _scatter(ax, _as_array(data, "data"), "data", "0.6", alpha=0.5)
    _scatter(ax, array, "samples", "C1")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Comparisons: one estimate per category, several series, error bars
# ---------------------------------------------------------------------------------------------

Series = Mapping[str, tuple[Sequence[float], Sequence[float] | None]]


def comparison(
    categories: Sequence[str],
    series: Series,
    ylabel: str,
    path: PathLike | None = None,
    title: str | None = None,
    log_scale: bool = False,
    note: str | None = None,
) -> Figure:
    """Estimates side by side: one x position per category (e.g. per bound), one marker and
    colour per series, each point with its error bar.

    :param categories: the x tick labels.
    :param series: ``name -> (values, errors)``, one value per category; ``errors`` (one per
        category, drawn as +-error) may be None. Non-finite values are skipped (and non-positive
        ones on a log scale).
    :param ylabel: the y axis label.
    :param log_scale: a logarithmic y axis (e.g. for signal-to-noise ratios).
    :param note: a line of small print under the axes (what the error bars are).
    :param path: where to save the figure (atomically), or None.
    """
    fig = Figure(figsize=(max(4.8, 1.1 * len(categories) + 2.0), 4.0))
    ax = fig.add_subplot()
    count = len(series)
    spread = min(0.5, 0.15 * (count - 1))  # series side by side within a category
    markers = "osD^v<>"
    drawn = False
    for index, (name, (values, errors)) in enumerate(series.items()):
        if len(values) != len(categories) or (errors is not None and len(errors) != len(values)):
            raise ValueError(
                f"series {name!r} has {len(values)} values for {len(categories)} categories"
            )
        offset = spread * (index / (count - 1) - 0.5) if count > 1 else 0.0
        points = [
            (position + offset, float(value), float(errors[position]) if errors else 0.0)
            for position, value in enumerate(values)
            if value is not None
            and math.isfinite(float(value))
            and (not log_scale or float(value) > 0)
        ]
        if not points:
            continue
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(
            xs,
            ys,
            yerr=[e if math.isfinite(e) else 0.0 for e in es] if errors else None,
            fmt=markers[index % len(markers)],
            color=f"C{index % 10}",
            capsize=4,
            markersize=6,
            label=name,
        )
        drawn = True
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20 if max(map(len, categories), default=0) > 8 else 0)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y", which="both" if log_scale else "major")
    if drawn and len(series) > 1:
        ax.legend(fontsize="small")
    if not drawn:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    if title:
        ax.set_title(title)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7, ha="left", va="top", color="0.3")
    return _finish(fig, path)


def log_joint_trace(posterior: Posterior, path: PathLike) -> Path:
    """The log joint of every chain of ``posterior`` (its ``warmup_log_joint``
    ``(num_chains, warmup)``, then its ``log_joint`` ``(num_chains, num_samples)``) against the
    step, the end of warm-up marked, saved to ``path``; returns the path."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    warm = posterior.warmup_log_joint
    for chain in range(posterior.num_chains):
        head = warm[chain].double() if warm.dim() == 2 else torch.zeros(0, dtype=torch.float64)
        trace = torch.cat([head, posterior.log_joint[chain].double()])
        ax.plot(trace.numpy(), lw=0.8, label=f"chain {chain}")
    if warm.numel():
        ax.axvline(warm.shape[1], color="grey", ls=":", label="end of warm-up")
    ax.set_xlabel("step (warm-up, then kept draws)")
    ax.set_ylabel("log joint (minibatch estimate)")
    ax.legend(fontsize=7)
    saved = save(fig, path)
    plt.close(fig)
    return saved

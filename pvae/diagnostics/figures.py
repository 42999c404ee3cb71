"""Matplotlib figures of the latent diagnostics: KL per dimension, activity, and the relevance
curve. As in :mod:`pvae.plots`: no ``pyplot``, each function returns a
:class:`matplotlib.figure.Figure` and, given ``path``, saves it atomically.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pvae.diagnostics.collapse import CollapseReport, KLPerDim
from pvae.diagnostics.latents import ActiveUnits
from pvae.diagnostics.relevance import LatentRelevance
from pvae.plots import PathLike, save

__all__ = ["activity_bars", "kl_bars", "relevance_curve"]


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


def _bars(
    values: dict[str, np.ndarray], threshold: float, ylabel: str, title: str, log: bool
) -> Figure:
    if not values:
        raise ValueError("nothing to plot: no latent site given")
    fig = Figure(figsize=(max(4.0, 3.2 * len(values)), 3.0), layout="constrained")
    axes = fig.subplots(1, len(values), squeeze=False)[0]
    for ax, (name, v) in zip(axes, values.items(), strict=True):
        dims = np.arange(v.size)
        below = v < threshold
        ax.bar(dims, v, color=np.where(below, "tab:gray", "tab:blue"))
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
        if log:
            ax.set_yscale("symlog", linthresh=max(threshold, 1e-6))
        ax.set_xlabel(f"dimension of {name}")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}", fontsize=10)
        if v.size <= 20:
            ax.set_xticks(dims)
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
    """Left: relevance scores in ranking order (relevant dimensions highlighted); right: the
    cumulative share of the total score, with the threshold (99%) line and the size of the
    relevant set marked."""
    scores = _numpy(result.scores)[result.ranking]
    cumulative = _numpy(result.cumulative)
    k = result.num_relevant
    positions = np.arange(1, scores.size + 1)
    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = ["tab:blue" if i < k else "tab:gray" for i in range(scores.size)]
    left.bar(positions, scores, color=colours)
    left.set_xticks(positions, [str(d) for d in result.ranking], fontsize=8)
    left.set_xlabel("latent dimension (by decreasing score)")
    left.set_ylabel("relevance score")
    left.set_title(f"{k} relevant of {scores.size}", fontsize=10)
    right.plot(positions, cumulative, marker="o", color="tab:blue")
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
    right.set_xlabel("number of dimensions")
    right.set_ylabel("cumulative share of score")
    right.legend(fontsize=8)
    return _finish(fig, path)

"""``pvae sample``: a sampler run (SGHMC over a model's weights, e.g. ``--model bae``), and its
diagnosis by ``pvae diagnose``.

``pvae sample`` takes only models registered with ``sampled=True`` (weights with priors:
``bae``); 4 chains by default, so that R-hat is defined; ``--bae-prior-scale auto`` (the
default) chooses the prior scale by DSWD (``BayesianAE.select_prior``) before sampling.
Its run folder holds, each written atomically, ``config.json`` (the
:class:`~pvae.app.runs.RunConfig`, with the scale used and, when chosen from the data,
``prior_selection``), :func:`pvae.sample`'s ``checkpoint.pt`` and ``run.json`` (``--resume``
continues bit-identically), ``posterior.pt`` (:meth:`pvae.Posterior.save`) and, for a model
with ``reconstruct(posterior, x)``, the reconstructions and their per-pixel sd.

``pvae diagnose`` on such a folder (:func:`diagnose_sample`) writes ``diagnostics.md`` (the
worst R-hat and lowest bulk ESS over the coordinates checked, a per-site table, ArviZ's
summary of the worst coordinates), ``trace.png`` and ``trace_sites.png``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyro.nn import PyroModule

import pvae
from pvae import data, plots
from pvae.evaluate import as_tensors
from pvae.sampling import Posterior

__all__ = [
    "POSTERIOR",
    "SampleDiagnosis",
    "describe_prior",
    "diagnose_sample",
    "load_posterior",
    "prior_selection",
    "run_sampler",
]

POSTERIOR = "posterior.pt"


def run_sampler(
    model: PyroModule,
    ds: data.Splits,
    run_dir: Path,
    sampler: Any,
    progress: bool = False,
    **settings: Any,
) -> Posterior:
    """:func:`pvae.sample` of ``model.model`` on ``ds.train`` with ``sampler`` (e.g.
    :class:`pvae.inference.SGHMC`) into ``run_dir``; ``settings``: its other arguments
    (``num_samples``, ``warmup``, ``thin``, ``num_chains``, ``batch_size``, ``seed``,
    ``resume``, ``checkpoint_every``). Writes ``posterior.pt`` and the figures.

    :raises pvae.SamplingInterrupted: on Ctrl-C, once the checkpoint is written.
    """
    posterior = pvae.sample(
        model.model, ds.train, sampler, run_dir=run_dir, progress=progress, **settings
    )
    posterior.save(run_dir / POSTERIOR)
    reconstruct = getattr(model, "reconstruct", None)
    if not callable(reconstruct) or "posterior" not in inspect.signature(reconstruct).parameters:
        return posterior  # only a model whose reconstructions average over posterior draws
    x = as_tensors(ds.test)[0][:10]
    mean, sd = reconstruct(posterior, x)
    plots.reconstructions(x, mean, ds.image_shape, path=run_dir / "reconstructions.png")
    if ds.image_shape is not None:
        title = "posterior sd of the reconstructions"
        path = run_dir / "reconstruction_sd.png"
        plots.samples(sd, ds.image_shape, path=path, nrow=10, title=title)
    return posterior


def load_posterior(run_dir: str | Path) -> Posterior:
    """The :class:`pvae.Posterior` a ``pvae sample`` run saved in ``posterior.pt``.

    :raises ValueError: the file is missing or not a posterior.
    """
    path = Path(run_dir) / POSTERIOR
    if not path.is_file():
        raise ValueError(f"{path} is missing: the sampler run did not finish")
    return Posterior.load(path, run_dir=str(run_dir))


def prior_selection(model: PyroModule) -> dict[str, Any] | None:
    """What a model's data-driven prior choice found (``prior_selection``), as the JSON of
    ``config.json``; None for a model without one."""
    found = getattr(model, "prior_selection", None)
    if found is None:
        return None
    return {
        "metric": found.metric,
        "chosen": found.best,
        "candidates": list(found.candidates),
        "distances": [round(float(d), 6) for d in found.distances],
    }


def describe_prior(options: dict[str, Any], selection: dict[str, Any] | None) -> str:
    """``prior scale 0.3 (chosen by DSWD among 0.1, 0.3, 1, 3)``; empty for a model without
    a prior scale."""
    if not isinstance(options.get("prior_scale"), int | float):
        return ""
    text = f"prior scale {options['prior_scale']:g}"
    if selection is not None:
        among = ", ".join(f"{c:g}" for c in selection["candidates"])
        text += f" (chosen by {selection['metric'].upper()} among {among})"
    return text


@dataclass
class SampleDiagnosis:
    """What :func:`diagnose_sample` returns: the report's lines, the files written, the worst
    R-hat and lowest bulk ESS over every coordinate, and a one-line verdict."""

    lines: list[str]
    files: list[Path] = field(default_factory=list)
    worst_rhat: float = math.nan
    lowest_ess: float = math.nan
    verdict: str = ""


def diagnose_sample(
    run_dir: Path, out_dir: Path, top: int = 8, per_site: int = 50
) -> SampleDiagnosis:
    """R-hat, ESS, the ArviZ summary and trace plots of a ``pvae sample`` run (see the module
    docstring); writes ``trace.png`` and ``trace_sites.png`` into ``out_dir`` and returns the
    report's lines (the caller writes ``diagnostics.md``).

    ArviZ computes R-hat and ESS one coordinate at a time (milliseconds each), so a network's
    tens of thousands of weights are checked on ``per_site`` evenly spaced coordinates per site
    (every coordinate of a smaller site); the report says how many.
    """
    import arviz
    import matplotlib.pyplot as plt

    posterior = load_posterior(run_dir)
    found = posterior.convergence(per_site, top)
    rows = [
        f"| {site} | {c.coordinates} | {c.checked} | {c.median_rhat:.3f} | {c.worst_rhat:.3f} | "
        f"{c.median_ess:.0f} | {c.lowest_ess:.0f} |"
        for site, c in found.sites.items()
    ]
    worst_rhat, lowest_ess, reduced = found.worst_rhat, found.lowest_ess, found.worst
    files = [plots.log_joint_trace(posterior, out_dir / "trace.png")]
    with warnings.catch_warnings():  # arviz's matplotlib backend warns on newer matplotlib
        warnings.simplefilter("ignore")
        axes = arviz.plot_trace(reduced.to_arviz(), compact=False)
    fig = axes.ravel()[0].figure
    files.append(plots.save(fig, out_dir / "trace_sites.png"))
    plt.close(fig)

    chains = posterior.num_chains
    rhat_text, convergence = _judged(worst_rhat, chains)
    verdict = (
        f"{rhat_text}, lowest bulk ESS {lowest_ess:.0f} over "
        f"{found.checked} checked coordinates of {len(posterior.samples)} sites ({chains} "
        f"chain{'s' if chains != 1 else ''} x {posterior.num_samples} draws): {convergence}"
    )
    lines = [
        "# Diagnostics of a sampler run",
        "",
        f"Run: `{run_dir}`. {verdict}.",
        "",
        "R-hat: rank-normalised split R-hat; ESS: bulk effective sample size (ArviZ).",
        "",
        "| site | coordinates | checked | median R-hat | worst R-hat | median ESS | lowest ESS |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"## ArviZ summary of the {len(reduced.samples)} coordinates with the worst R-hat",
        "",
        "```",
        reduced.summary().to_string(),
        "```",
        "",
        "Figures: `trace.png` (log joint of every chain), `trace_sites.png` (traces of the "
        "coordinates above).",
    ]
    return SampleDiagnosis(lines, files, worst_rhat, lowest_ess, verdict)


def _judged(worst_rhat: float, num_chains: int) -> tuple[str, str]:
    """The worst R-hat as text, and the verdict on convergence it supports (R-hat compares
    chains, so one chain gives none)."""
    if num_chains < 2:
        return "R-hat undefined (one chain)", (
            "convergence not judged: R-hat compares chains and is undefined with one chain "
            "(sample with --chains 2 or more)"
        )
    if math.isnan(worst_rhat):
        return "R-hat undefined", (
            "convergence not judged: R-hat is undefined (every checked coordinate is constant)"
        )
    rhat_text = f"worst R-hat {worst_rhat:.3f}"
    if worst_rhat < 1.1:
        return rhat_text, "no sign of non-convergence (R-hat < 1.1)"
    return rhat_text, "not converged (R-hat >= 1.1)"

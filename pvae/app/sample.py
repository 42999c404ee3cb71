"""``pvae sample``: a sampler run (SGHMC over a model's weights, e.g. ``--model bae``), and its
diagnosis by ``pvae diagnose``.

``pvae sample`` takes only models registered with ``sampled=True`` (weights with priors:
``bae``); 4 chains by default, so that R-hat is defined; ``--bae-prior-scale auto`` (the
default) chooses the prior scale by DSWD (``BayesianAE.select_prior``) before sampling.

A sample run folder holds (every file written atomically):

- ``config.json``: the :class:`pvae.app.runs.RunConfig` (``command="sample"``,
  ``engine="sghmc"``; ``model_options["prior_scale"]`` the scale used, a number), every
  argument, the canonical command line and, when the scale was chosen from the data,
  ``prior_selection`` (``metric``, ``chosen``, ``candidates``, ``distances``);
- ``checkpoint.pt`` and ``run.json``: written by :func:`pvae.sample` every
  ``--checkpoint-every`` steps, after every chain and on Ctrl-C; ``--resume`` continues
  bit-identically;
- ``posterior.pt``: the :class:`pvae.Posterior` as a dict (``samples`` site ->
  ``(chains, draws, *shape)``, ``log_joint``, ``warmup_log_joint``, ``settings``);
- ``reconstructions.png`` (test images over their posterior-mean reconstructions) and
  ``reconstruction_sd.png`` (the per-pixel standard deviation over draws), for a model with
  ``reconstruct(posterior, x)``.

``pvae diagnose`` on such a folder writes ``diagnostics.md``: the worst R-hat and the lowest
bulk ESS over the coordinates checked (every coordinate of a small site, 50 evenly spaced ones
of a larger one), a per-site table, and ``Posterior.summary()``
(ArviZ) of the coordinates with the worst R-hat; and ``trace.png`` (the log joint of every
chain, warm-up included) and ``trace_sites.png`` (``arviz.plot_trace`` of those coordinates).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyro.nn import PyroModule

import pvae
from pvae import atomic, data, plots
from pvae.evaluate import as_tensors
from pvae.inference import SGHMC
from pvae.sampling import Posterior

__all__ = [
    "POSTERIOR",
    "SAMPLE_FIGURES",
    "SampleDiagnosis",
    "diagnose_sample",
    "load_posterior",
    "run_sampler",
]

POSTERIOR = "posterior.pt"
SAMPLE_FIGURES = ("reconstructions.png", "reconstruction_sd.png", "trace.png", "trace_sites.png")


def run_sampler(
    model: PyroModule,
    ds: data.Splits,
    run_dir: Path,
    settings: Mapping[str, Any],
    progress: bool = False,
    sampler: Any = None,
) -> Posterior:
    """Sample ``model.model`` on ``ds.train`` with ``sampler`` (default
    ``SGHMC(lr=settings["lr"], friction=settings["friction"], init_radius=...)``, SGHMC's own
    defaults for those not given) into ``run_dir``; ``settings``: ``num_samples``,
    ``warmup``, ``thin``, ``num_chains``, ``batch_size``, ``seed``, ``resume``,
    ``checkpoint_every`` (optional).
    Writes ``posterior.pt`` and the figures.

    :raises pvae.SamplingInterrupted: on Ctrl-C, once the checkpoint is written.
    """
    if sampler is None:
        given = {key: settings[key] for key in ("lr", "friction", "init_radius") if key in settings}
        sampler = SGHMC(**given)
    extra = {}
    if "checkpoint_every" in settings:
        extra["checkpoint_every"] = settings["checkpoint_every"]
    posterior = pvae.sample(
        model.model,
        ds.train,
        sampler,
        num_samples=settings["num_samples"],
        warmup=settings["warmup"],
        thin=settings["thin"],
        num_chains=settings["num_chains"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        run_dir=run_dir,
        resume=settings.get("resume", False),
        progress=progress,
        **extra,
    )
    atomic.save_torch(
        {
            "samples": posterior.samples,
            "log_joint": posterior.log_joint,
            "warmup_log_joint": posterior.warmup_log_joint,
            "settings": posterior.settings,
        },
        run_dir / POSTERIOR,
    )
    _figures(model, posterior, ds, run_dir)
    return posterior


def _figures(model: PyroModule, posterior: Posterior, ds: data.Splits, run_dir: Path) -> None:
    reconstruct = getattr(model, "reconstruct", None)
    if not callable(reconstruct) or "posterior" not in inspect.signature(reconstruct).parameters:
        return  # only a model whose reconstructions average over posterior draws
    x = as_tensors(ds.test)[0][:10]
    mean, sd = reconstruct(posterior, x)
    shape = ds.image_shape
    plots.reconstructions(x, mean, shape, path=run_dir / "reconstructions.png")
    if shape is not None:
        plots.samples(
            sd,
            shape,
            path=run_dir / "reconstruction_sd.png",
            nrow=10,
            title="posterior sd of the reconstructions",
        )


def load_posterior(run_dir: str | Path) -> Posterior:
    """The :class:`pvae.Posterior` a ``pvae sample`` run saved in ``posterior.pt``.

    :raises ValueError: the file is missing or not a posterior.
    """
    path = Path(run_dir) / POSTERIOR
    if not path.is_file():
        raise ValueError(f"{path} is missing: the sampler run did not finish")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(state, dict) or "samples" not in state or "log_joint" not in state:
        raise ValueError(f"{path} does not hold the samples of a pvae sample run")
    return Posterior(
        samples=dict(state["samples"]),
        log_joint=state["log_joint"],
        warmup_log_joint=state.get("warmup_log_joint", torch.zeros(0)),
        run_dir=str(run_dir),
        settings=dict(state.get("settings", {})),
    )


@dataclass
class SampleDiagnosis:
    """What :func:`diagnose_sample` returns: the report's lines, the files written, the worst
    R-hat and lowest bulk ESS over every coordinate, and a one-line verdict."""

    lines: list[str]
    files: list[Path] = field(default_factory=list)
    worst_rhat: float = math.nan
    lowest_ess: float = math.nan
    verdict: str = ""


def _coordinate(site: str, shape: torch.Size, flat_index: int) -> str:
    if not shape:
        return site
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape)]
    return f"{site}[{', '.join(map(str, index))}]"


def _site_index(posterior: Posterior, per_site: int) -> dict[str, torch.Tensor]:
    """Per site, the flat indices of the coordinates checked: all of them, or ``per_site``
    evenly spaced ones."""
    index = {}
    for site, values in posterior.samples.items():
        size = values[0, 0].numel()
        count = min(size, per_site)
        index[site] = torch.linspace(0, size - 1, count).round().long().unique()
    return index


def _coordinates_checked(posterior: Posterior, per_site: int) -> Posterior:
    samples = {
        site: posterior.samples[site].reshape(posterior.num_chains, posterior.num_samples, -1)[
            :, :, index
        ]
        for site, index in _site_index(posterior, per_site).items()
    }
    return Posterior(samples, posterior.log_joint, posterior.warmup_log_joint)


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
    checked = _coordinates_checked(posterior, per_site)
    rhat, ess = checked.rhat(), checked.ess()
    rows, scored = [], []
    for site, index in _site_index(posterior, per_site).items():
        r, e = rhat[site].reshape(-1).double(), ess[site].reshape(-1).double()
        rows.append(
            f"| {site} | {posterior.samples[site][0, 0].numel()} | {r.numel()} | "
            f"{float(r.nanmedian()):.3f} | {float(_nanmax(r)):.3f} | "
            f"{float(e.nanmedian()):.0f} | {float(_nanmin(e)):.0f} |"
        )
        count = min(top, r.numel())
        worst = torch.topk(torch.nan_to_num(r, nan=math.inf), count).indices
        scored += [(float(r[i]), site, int(index[i])) for i in worst]
    scored.sort(key=lambda item: -item[0] if not math.isnan(item[0]) else -math.inf)
    chosen = scored[:top]
    worst_rhat = max((float(_nanmax(rhat[s].reshape(-1).double())) for s in rhat), default=math.nan)
    lowest_ess = min((float(_nanmin(ess[s].reshape(-1).double())) for s in ess), default=math.nan)
    subset = {
        _coordinate(site, posterior.samples[site].shape[2:], i): posterior.samples[site].reshape(
            posterior.num_chains, posterior.num_samples, -1
        )[:, :, i]
        for _, site, i in chosen
    }
    reduced = Posterior(subset, posterior.log_joint, posterior.warmup_log_joint)
    summary = reduced.summary().to_string()

    files = [_log_joint_trace(posterior, out_dir / "trace.png")]
    with warnings.catch_warnings():  # arviz's matplotlib backend warns on newer matplotlib
        warnings.simplefilter("ignore")
        axes = arviz.plot_trace(reduced.to_arviz(), compact=False)
    fig = axes.ravel()[0].figure
    files.append(plots.save(fig, out_dir / "trace_sites.png"))
    plt.close(fig)

    verdict = (
        f"{_rhat_text(worst_rhat, posterior.num_chains)}, lowest bulk ESS {lowest_ess:.0f} over "
        f"{sum(t[0, 0].numel() for t in checked.samples.values())} checked coordinates of "
        f"{len(posterior.samples)} sites ({posterior.num_chains} chain"
        f"{'s' if posterior.num_chains != 1 else ''} x {posterior.num_samples} draws): "
        + _convergence(worst_rhat, posterior.num_chains)
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
        f"## ArviZ summary of the {len(subset)} coordinates with the worst R-hat",
        "",
        "```",
        summary,
        "```",
        "",
        "Figures: `trace.png` (log joint of every chain), `trace_sites.png` (traces of the "
        "coordinates above).",
    ]
    return SampleDiagnosis(lines, files, worst_rhat, lowest_ess, verdict)


def _log_joint_trace(posterior: Posterior, path: Path) -> Path:
    """``trace.png``: the log joint of every chain over warm-up and kept draws."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for chain in range(posterior.num_chains):
        warm = posterior.warmup_log_joint
        head = warm[chain].double() if warm.dim() == 2 else torch.zeros(0, dtype=torch.float64)
        trace = torch.cat([head, posterior.log_joint[chain].double()])
        ax.plot(trace.numpy(), lw=0.8, label=f"chain {chain}")
    if posterior.warmup_log_joint.numel():
        ax.axvline(
            posterior.warmup_log_joint.shape[1], color="grey", ls=":", label="end of warm-up"
        )
    ax.set_xlabel("step (warm-up, then kept draws)")
    ax.set_ylabel("log joint (minibatch estimate)")
    ax.legend(fontsize=7)
    saved = plots.save(fig, path)
    plt.close(fig)
    return saved


def _rhat_text(worst_rhat: float, num_chains: int) -> str:
    if num_chains < 2:
        return "R-hat undefined (one chain)"
    if math.isnan(worst_rhat):
        return "R-hat undefined"
    return f"worst R-hat {worst_rhat:.3f}"


def _convergence(worst_rhat: float, num_chains: int) -> str:
    """The verdict on convergence that the worst R-hat supports (R-hat compares chains, so one
    chain gives none)."""
    if num_chains < 2:
        return (
            "convergence not judged: R-hat compares chains and is undefined with one chain "
            "(sample with --chains 2 or more)"
        )
    if math.isnan(worst_rhat):
        return "convergence not judged: R-hat is undefined (every checked coordinate is constant)"
    if worst_rhat < 1.1:
        return "no sign of non-convergence (R-hat < 1.1)"
    return "not converged (R-hat >= 1.1)"


def _nanmax(t: torch.Tensor) -> torch.Tensor:
    finite = t[~torch.isnan(t)]
    return finite.max() if finite.numel() else torch.tensor(math.nan)


def _nanmin(t: torch.Tensor) -> torch.Tensor:
    finite = t[~torch.isnan(t)]
    return finite.min() if finite.numel() else torch.tensor(math.nan)

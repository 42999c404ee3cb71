"""``pvae diagnose``: latent diagnostics of a trained run folder.

:func:`diagnose` reads a folder of ``pvae train`` or ``pvae compare`` (diagnosed bound by bound
into subfolders under a summary), rebuilds data and model from its
:class:`~pvae.app.runs.RunConfig`, loads the trained parameters (``weights_only=True``) and
writes next to the run (or into ``out_dir``), atomically, ``diagnostics.md`` (the collapse
verdict, the active units and per latent dimension its KL, activity, collapse
(:func:`pvae.diagnostics.collapse_report`) and decoder-Jacobian relevance (Saha et al. 2025))
and the figures of :mod:`pvae.diagnostics.figures`. A ``pvae sample`` run gets R-hat, ESS and
trace plots (:func:`pvae.app.sample.diagnose_sample`).

The diagnostics use the first ``num_points`` test points, seeded with the run's seed (the
global random state is left as found); Pyro's parameter store is left holding the last model.
Problems with the folder raise :class:`DiagnoseError`, naming what is missing and what the
folder holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from matplotlib.figure import Figure
from pyro.nn import PyroModule

import pvae.checkpoint
from pvae import atomic, data, plots
from pvae.app import runs
from pvae.app.registry import MODELS, parse_bound
from pvae.app.report import markdown_table
from pvae.app.runs import bound_folder
from pvae.diagnostics import (
    ActiveUnits,
    CollapseReport,
    LatentRelevance,
    collapse_report,
    count_active,
    latent_activity,
    latent_relevance,
    layer_sites,
    posterior_mean,
    relevant_in_use,
)
from pvae.diagnostics.figures import (
    activity_bars,
    kl_bars,
    posterior_paths,
    relevance_curve,
    selection_curves,
    traversals,
)
from pvae.evaluate import as_tensors
from pvae.train import CHECKPOINT, load_checkpoint

__all__ = [
    "FILES",
    "DiagnoseError",
    "Diagnosis",
    "LoadedRun",
    "diagnose",
    "load_parameters",
    "load_run",
    "posterior_paths",
    "relevant_in_use",
    "traversals",
]

CONFIG = runs.CONFIG
RESULTS = "results.json"
REPORT = "diagnostics.md"
FIGURES = ("kl_per_dim.png", "activity.png", "relevance.png", "traversals.png")
FILES = (REPORT, *FIGURES)
TRAVERSAL_DIMS = 3
TRAVERSAL_RANGE = 3.0


class DiagnoseError(runs.RunFolderError):
    """The run folder cannot be diagnosed; the message says why (the CLI exits with 2)."""


@dataclass
class Diagnosis:
    """What :func:`diagnose` returns.

    ``kind``: "train", "compare" or "sample"; ``files``: the paths written; ``verdict``: the
    collapse verdict (a compare run: one line per bound); ``collapse``, ``relevance``,
    ``activity``, ``relevant``: the diagnostics of one trained model (None/empty for a compare
    run); ``bounds``: for a compare run, each bound's :class:`Diagnosis` by label (None where
    the bound was skipped, ``skipped`` saying why).
    """

    kind: str
    run_dir: Path
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    verdict: str = ""
    collapse: CollapseReport | None = None
    relevance: LatentRelevance | None = None
    activity: dict[str, ActiveUnits] = field(default_factory=dict)
    relevant: list[int] = field(default_factory=list)
    bounds: dict[str, Diagnosis | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.out_dir / REPORT

    @property
    def active_units(self) -> tuple[int, int]:
        """``(active units, latent dimensions)``, as ``pvae compare`` counts them."""
        return count_active(self.activity)


# -- Reading a run folder ------------------------------------------------------------------


def _contents(folder: Path, limit: int = 10) -> str:
    """``"it holds a.txt, sub/"`` or ``"it is empty"``, for error messages."""
    if not folder.is_dir():
        return "it does not exist"
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as error:
        return f"it cannot be listed ({error})"
    if not entries:
        return "it is empty"
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries]
    more = f", ... ({len(names)} entries in all)" if len(names) > limit else ""
    return f"it holds {', '.join(names[:limit])}{more}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DiagnoseError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise DiagnoseError(f"cannot read {path}: expected a JSON object")
    return value


def _kind(run_dir: Path) -> str:
    """ "train" or "compare", or a :class:`DiagnoseError` saying what is missing."""
    if not run_dir.exists():
        raise DiagnoseError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise DiagnoseError(
            f"{run_dir} is not a folder (give the run folder of 'pvae train' or 'pvae compare')"
        )
    if (run_dir / RESULTS).is_file():
        return "compare"
    has_config, has_checkpoint = (run_dir / CONFIG).is_file(), (run_dir / CHECKPOINT).is_file()
    bound_folders = [p.name for p in sorted(run_dir.iterdir()) if (p / CHECKPOINT).is_file()]
    compared = bound_folders and not has_config and not has_checkpoint
    if runs.recorded_command(run_dir) == "compare" or compared:
        raise DiagnoseError(
            f"{run_dir} looks like a 'pvae compare' run (bound folders "
            f"{', '.join(bound_folders) or 'none'}) but {RESULTS} is missing: the comparison "
            f"did not finish ({_contents(run_dir)})"
        )
    if has_config and has_checkpoint:
        return "train"
    if has_config or has_checkpoint:
        missing = CHECKPOINT if has_config else CONFIG
        raise DiagnoseError(
            f"{run_dir} looks like a 'pvae train' run but {missing} is missing "
            f"({_contents(run_dir)})"
        )
    raise DiagnoseError(
        f"{run_dir} is not a pvae run folder: {CONFIG} and {CHECKPOINT} (from 'pvae train') "
        f"and {RESULTS} (from 'pvae compare') are missing ({_contents(run_dir)})"
    )


def _rebuild(run_dir: Path) -> tuple[runs.RunConfig, dict[str, Any], data.Splits]:
    """The run's configuration, its ``config.json`` and its (prepared) dataset."""
    try:
        config, document = runs.read_config(run_dir)
    except runs.RunFolderError as error:
        raise DiagnoseError(str(error)) from error
    try:
        ds = config.load_data()
    except (ValueError, TypeError, KeyError, OSError, ImportError) as error:
        raise DiagnoseError(f"cannot rebuild the dataset {config.dataset!r}: {error}") from error
    return config, document, ds


def load_parameters(model: PyroModule, ds: data.Splits, checkpoint: Path) -> dict[str, Any]:
    """:func:`pvae.checkpoint.load_parameters` of ``checkpoint`` into ``model`` (its parameters
    created on two test points); returns the checkpoint.

    :raises DiagnoseError: an unreadable checkpoint, or one whose parameters (names or shapes)
        do not match the model.
    """
    try:
        state = load_checkpoint(checkpoint)
    except (OSError, ValueError) as error:  # torch's messages span lines: keep the first
        raise DiagnoseError(str(error).strip().splitlines()[0]) from error
    batch = tuple(t[:2] for t in as_tensors(ds.test))
    try:
        pvae.checkpoint.load_parameters(model.model, model.guide, batch, state, checkpoint)
    except ValueError as error:
        raise DiagnoseError(str(error)) from error
    return state


@dataclass
class LoadedRun:
    """A run rebuilt from its folder: the data, the trained model and what was recorded."""

    ds: data.Splits
    model: PyroModule
    seed: int
    title: str
    command: list[str]
    checkpoint: dict[str, Any]
    metrics: dict[str, Any] | None = None
    model_name: str = "vae"


def _load_model(
    config: runs.RunConfig, ds: data.Splits, checkpoint: Path, title: str, command: Sequence[str]
) -> LoadedRun:
    """The model of ``config`` rebuilt on ``ds`` (Pyro's parameter store cleared first) with
    the trained parameters of ``checkpoint``."""
    pyro.clear_param_store()
    try:
        model = config.build_model(ds)
    except (ValueError, KeyError, TypeError) as error:
        raise DiagnoseError(f"cannot rebuild the model {config.model!r}: {error}") from error
    state = load_parameters(model, ds, checkpoint)
    return LoadedRun(ds, model, config.seed, title, list(command), state, None, config.model)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a ``pvae train`` run: data and model from its :class:`RunConfig`
    (``config.json``), parameters from ``checkpoint.pt``. Clears Pyro's parameter store."""
    run_dir = Path(run_dir)
    if _kind(run_dir) != "train":
        raise DiagnoseError(f"{run_dir} is a 'pvae compare' run; use diagnose() for it")
    config, document, ds = _rebuild(run_dir)
    if config.command != "train":
        raise DiagnoseError(f"{run_dir / CONFIG} is not the config of a 'pvae train' run")
    title = f"{config.model} / {config.engine or '?'} on {config.dataset}"
    argv = ["pvae", *(document.get("argv") or [])]
    run = _load_model(config, ds, run_dir / CHECKPOINT, title, argv)
    try:
        run.metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    return run


# -- Diagnosing one trained model ----------------------------------------------------------


def _numbers(value: Any) -> str:
    """A number or a list of numbers, 4 significant digits each."""
    if isinstance(value, list | tuple):
        return ", ".join(f"{float(v):.4g}" for v in value)
    return f"{float(value):.4g}"


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


@dataclass
class _Findings:
    """What the diagnostics of one trained model found: the collapse report, the activity per
    site, the site scored for relevance, the relevance (None without a decoder of z alone),
    the relevant dimensions, the ones traversed and notes for the report."""

    report: CollapseReport
    activity: dict[str, ActiveUnits]
    site: str
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    relevance: LatentRelevance | None = None
    relevant: list[int] = field(default_factory=list)
    top: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _table(found: _Findings) -> str:
    """The per-dimension table: every latent site's KL, activity and collapse, and the
    relevance of the scored site's dimensions."""
    relevance = found.relevance
    header = ["site", "dim", "KL (nats)", "activity", "active", "collapsed"]
    header += ["relevance", "rank", "relevant"] if relevance is not None else []
    rows = []
    for name, layer in found.report.layers.items():
        units = found.activity.get(name)
        variances = units.variances if units is not None else layer.activity
        actives = units.active if units is not None else layer.active
        for d in range(layer.dims):
            yes = ["yes" if flag else "no" for flag in (actives[d], layer.collapsed[d])]
            row = [name, str(d), _number(float(layer.kl[d])), _number(float(variances[d])), *yes]
            if relevance is not None and name == found.site:
                mark = "yes" if d in found.relevant else "no"
                rank = str(relevance.ranking.index(d) + 1)
                row += [_number(float(relevance.scores[d])), rank, mark]
            rows.append(row + [""] * (len(header) - len(row)))
    return markdown_table(header, rows)


def _relevance_lines(found: _Findings) -> list[str]:
    """The report's sections on the relevance and the traversals (none without relevance)."""
    relevance, top = found.relevance, found.top
    if relevance is None:
        return []
    return [
        "## Latent relevance",
        "",
        f"{len(found.relevant)} of {relevance.scores.numel()} dimensions of {found.site} are "
        f"relevant: {', '.join(map(str, found.relevant)) or 'none'} (ranking by score "
        f"{', '.join(map(str, relevance.ranking))}).",
        "",
        "![relevance](relevance.png)",
        "",
        "## Latent traversals",
        "",
        f"Dimensions {', '.join(map(str, top))} (the most relevant) moved from "
        f"{-TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:+g} around the posterior mean of the "
        "first test point, the others held at it; decoded means of p(x | z).",
        "",
        "![traversals](traversals.png)",
        "",
    ]


def _header(title: str, run_dir: Path, command: Sequence[str]) -> list[str]:
    """The first lines of a ``diagnostics.md``: its title, the run folder and the command."""
    lines = [f"# Diagnostics: {title}", "", f"Run folder: `{run_dir}`", ""]
    return lines + (["```", " ".join(command), "```", ""] if command else [])


def _markdown(
    run: LoadedRun, run_dir: Path, facts: Sequence[str], found: _Findings, paths: bool
) -> str:
    """``diagnostics.md`` of one trained model (``paths``: ``paths.png`` was written)."""
    report, relevance = found.report, found.relevance
    count, dims = count_active(found.activity)
    relevant = (
        "; **relevance** and **rank**, the decoder-Jacobian score; **relevant**, among the "
        f"dimensions not collapsed, the fewest carrying {100 * relevance.threshold:g}% of "
        "their score (a collapsed dimension is never relevant)."
        if relevance is not None
        else "."
    )
    lines = [
        *_header(run.title, run_dir, run.command),
        *(f"- {fact}" for fact in facts),
        f"- active units: {count}/{dims} (Var_x E[z_d | x] > 0.01; the number 'pvae compare' "
        "reports)",
        *["", "## Posterior collapse", "", "```", report.verdict, "```", ""],
        "Columns: **KL**, the mean KL(q(z_d | x) || p(z_d)) over the test points; "
        "**activity**, Var_x E[z_d | x]; **active**, activity > 0.01; **collapsed**, the "
        f"posterior is the prior: mean KL below {report.kl_threshold:g} nats (and, in a layer "
        f"whose term is not a KL, inactive){relevant}",
        *["", _table(found), "", "![KL per dimension](kl_per_dim.png)", ""],
        *["![activity per dimension](activity.png)", "", *_relevance_lines(found)],
    ]
    if found.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in found.notes], ""]
    text = "\n".join(lines)
    hyperparameters = getattr(run.model, "hyperparameters", None)
    if callable(hyperparameters):  # e.g. a GP prior's learned lengthscales
        rows = [f"- {name}: {_numbers(value)}" for name, value in hyperparameters().items()]
        text += "\n## Learned hyperparameters\n\n" + "\n".join(rows) + "\n"
    if paths:
        text += (
            "\n## Posterior paths\n\nE_q[z_tc | x] ± 2 sd per channel c over the steps t of "
            "the first test sequence.\n\n![posterior paths](paths.png)\n"
        )
    return text


def _measure(run: LoadedRun, x: Any, activity: dict[str, ActiveUnits]) -> _Findings:
    """The collapse report and, for a model with a decoder of z alone, the relevance of the
    first latent site's dimensions (under the caller's seed)."""
    entry = MODELS[run.model_name]
    try:
        report = collapse_report(run.model.model, run.model.guide, x, channels=entry.channels)
    except ValueError as error:
        raise DiagnoseError(f"cannot diagnose the {run.model_name} model: {error}") from error
    sites = layer_sites(run.model)
    site = sites[0] if sites[0] in report.layers else next(iter(report.layers))
    found = _Findings(report, activity, site)
    decode = entry.decoder(run.model)
    if callable(decode):
        found.decode = decode
        found.relevance = latent_relevance(run.model.guide, decode, x, site=site)
        found.relevant = relevant_in_use(found.relevance, report.layers[site].collapsed_dims)
        found.top = found.relevance.ranking[:TRAVERSAL_DIMS]
    elif entry.channels:
        found.notes.append(
            f"sites {', '.join(entry.channels)} are reported per channel (dimension map "
            f"{entry.channels}): KL summed (for a smoothed path, the KLs of the 1-d marginals) "
            "and activity averaged over the other event axes (time); no relevance score "
            "or traversal of one z vector: paths.png shows the posterior paths"
        )
    else:
        found.notes.append(
            "the model has no decoder of z alone: no relevance score and no traversals"
        )
    return found


def _figures(run: LoadedRun, first: tuple, found: _Findings) -> dict[str, Figure]:
    """The figures by file name; ``first``: the first test point, as the model's arguments."""
    report = found.report
    figures = {
        "kl_per_dim.png": kl_bars(report, threshold=report.kl_threshold),
        "activity.png": activity_bars(report),
    }
    if found.relevance is not None and found.decode is not None:
        figures["relevance.png"] = relevance_curve(found.relevance)
        mu = posterior_mean(run.model.guide, first, found.site)[0].reshape(-1)
        figures["traversals.png"] = traversals(
            found.decode, mu, found.top, run.ds.image_shape, span=TRAVERSAL_RANGE
        )
    channels = MODELS[run.model_name].channels
    if channels and found.site in channels:
        channels_first = channels[found.site] in (0, -2, "channels_first")
        paths = posterior_paths(run.model.guide, first, found.site, channels_first)
        if paths is not None:
            figures["paths.png"] = paths
    return figures


def _diagnose_model(
    run: LoadedRun, run_dir: Path, out_dir: Path, num_points: int, facts: Sequence[str]
) -> Diagnosis:
    """Diagnose ``run``'s model on the first ``num_points`` test points, seeded with the
    run's seed; writes ``diagnostics.md`` and the figures into ``out_dir``."""
    batch = tuple(t[:num_points] for t in as_tensors(run.ds.test))
    x: Any = batch if len(batch) > 1 else batch[0]
    run.model.eval()  # e.g. no self-supervised masking while measuring
    channels = MODELS[run.model_name].channels
    activity = latent_activity(run.model, x, run.seed, channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        found = _measure(run, x, activity)
        figures = _figures(run, tuple(t[:1] for t in batch), found)
        files = [plots.save(figure, out_dir / name) for name, figure in figures.items()]
    text = _markdown(run, run_dir, facts, found, paths="paths.png" in figures)
    files.insert(0, atomic.write_text(out_dir / REPORT, text))
    report, relevance = found.report, found.relevance
    diagnosis = Diagnosis("train", run_dir, out_dir, files, report.verdict, report, relevance)
    diagnosis.activity, diagnosis.relevant = activity, found.relevant
    return diagnosis


def _log_likelihood_fact(mean: Any, stderr: Any, samples: Any) -> str:
    return f"test log-likelihood {_number(mean, 5)} +- {_number(stderr, 2)} nats (K={samples})"


def _common_facts(run: LoadedRun, num_points: int) -> tuple[str, str]:
    """The epochs trained and the number of test points diagnosed."""
    count = as_tensors(run.ds.test)[0].shape[0]
    return (
        f"epochs trained: {int(run.checkpoint.get('epoch', -1)) + 1}",
        f"diagnostics on the first {min(num_points, count)} test points",
    )


def _diagnose_train(run_dir: Path, out_dir: Path, num_points: int) -> Diagnosis:
    run = load_run(run_dir)
    epochs, points = _common_facts(run, num_points)
    facts = [epochs]
    history = run.checkpoint.get("history") or []
    if history:
        last = history[-1]
        facts.append(
            f"last epoch: train bound {_number(last.get('train_bound'), 5)}, valid bound "
            f"{_number(last.get('valid_bound'), 5)} nats"
        )
    test = (run.metrics or {}).get("test_log_likelihood")
    if isinstance(test, dict):
        facts.append(
            _log_likelihood_fact(test.get("mean"), test.get("stderr"), test.get("num_samples"))
        )
    return _diagnose_model(run, run_dir, out_dir, num_points, [*facts, points])


# -- A compare run -------------------------------------------------------------------------


def _diagnose_compare(
    run_dir: Path, out_dir: Path, num_points: int, say: Callable[[str], None] | None
) -> Diagnosis:
    results = _read_json(run_dir / RESULTS)
    summary, rows = results.get("config"), results.get("results")
    if not isinstance(summary, dict) or not isinstance(rows, list):
        raise DiagnoseError(f"{run_dir / RESULTS} is not the results of a 'pvae compare' run")
    if not (run_dir / CONFIG).is_file():
        raise DiagnoseError(
            f"{run_dir} holds {RESULTS} but no {CONFIG} to rebuild the run from "
            f"({_contents(run_dir)})"
        )
    config, _, ds = _rebuild(run_dir)
    command = [str(item) for item in results.get("command", [])]
    diagnosis = Diagnosis(kind="compare", run_dir=run_dir, out_dir=out_dir)
    for row in rows:
        label = str(row.get("bound"))
        folder = bound_folder(parse_bound(label)) if label else label
        if row.get("run"):  # one seed of several: its own folder, BOUND/seed-S
            label = folder = str(row["run"])
        checkpoint = run_dir / folder / CHECKPOINT
        if not checkpoint.is_file():
            if row.get("status") == "ok":
                raise DiagnoseError(
                    f"{run_dir / folder} has no {CHECKPOINT} for bound {label!r} "
                    f"({_contents(run_dir / folder)})"
                )
            diagnosis.skipped[label] = f"no checkpoint ({row.get('status')})"
            diagnosis.bounds[label] = None
            continue
        title = f"{config.model} / {label} on {config.dataset}"
        run = _load_model(config, ds, checkpoint, title, command)
        epochs, points = _common_facts(run, num_points)
        ll = (row.get("log_likelihood"), row.get("log_likelihood_stderr"))
        facts = [f"bound {label}: {row.get('engine', '')}", epochs]
        facts += [_log_likelihood_fact(*ll, summary.get("ll_samples")), points]
        if row.get("status") != "ok":
            facts.append(f"status: {row.get('status')} (the last good checkpoint)")
        child = _diagnose_model(run, run_dir / folder, out_dir / folder, num_points, facts)
        diagnosis.bounds[label] = child
        diagnosis.files += child.files
        if say is not None:
            say(f"[{label}] {child.verdict.splitlines()[0]} -> {child.report}")
    text = _compare_markdown(run_dir, command, summary, rows, diagnosis)
    diagnosis.files.insert(0, atomic.write_text(out_dir / REPORT, text))
    diagnosis.verdict = "\n".join(
        f"{label}: {child.verdict.splitlines()[0] if child else diagnosis.skipped[label]}"
        for label, child in diagnosis.bounds.items()
    )
    return diagnosis


def _compare_row(
    label: str, row: Mapping[str, Any], child: Diagnosis | None, skipped: str | None
) -> list[str]:
    """One bound's row of the compare summary (``row``: its row of ``results.json``)."""
    ll = _number(row.get("log_likelihood"), 5)
    if child is None or child.collapse is None:
        return [label, ll, f"skipped: {skipped}", "", "", "", "", ""]
    verdict = child.verdict.splitlines()[0].removeprefix("Verdict: ").rstrip(".")
    layers = child.collapse.layers.values()
    collapsed = sum(len(layer.collapsed_dims) for layer in layers)
    active, dims = child.active_units
    kl = _number(sum(float(layer.kl.sum()) for layer in layers))
    relevant = ", ".join(map(str, child.relevant)) if child.relevance is not None else "n/a"
    link = f"[{child.out_dir.name}/{REPORT}]({child.out_dir.name}/{REPORT})"
    return [label, ll, verdict, f"{active}/{dims}", f"{collapsed}/{dims}", kl, relevant, link]


def _compare_markdown(
    run_dir: Path,
    command: Sequence[str],
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    diagnosis: Diagnosis,
) -> str:
    title = f"{config.get('model')} on {config.get('dataset')}, {len(rows)} bounds"
    header = ["bound", "log p(x)", "verdict", "active units", "collapsed", "KL (nats)"]
    by_label = {str(row.get("bound")): row for row in rows}
    table = [
        _compare_row(label, by_label.get(label, {}), child, diagnosis.skipped.get(label))
        for label, child in diagnosis.bounds.items()
    ]
    lines = [
        *_header(title, run_dir, command),
        markdown_table([*header, "relevant dims", "report"], table),
        "",
        "active units: Var_x E[z_d | x] > 0.01, the number of the 'active units' column of "
        "results.md; collapsed: posterior equal to the prior (see each report).",
        "",
    ]
    for label, child in diagnosis.bounds.items():
        if child is not None:
            lines += [f"## {label}", "", "```", child.verdict, "```", ""]
            lines += [f"![KL per dimension, {label}]({child.out_dir.name}/kl_per_dim.png)", ""]
    return "\n".join(lines)


# -- Entry point ---------------------------------------------------------------------------


def _diagnose_sample(run_dir: Path, out: Path) -> Diagnosis:
    """R-hat, ESS, the ArviZ summary and trace plots of a sampler run
    (:func:`pvae.app.sample.diagnose_sample`); when the run chose its prior scale from the
    data, ``prior_selection.png``: the distance of every candidate, its minimum marked."""
    from pvae.app.sample import diagnose_sample

    try:
        found = diagnose_sample(run_dir, out)
    except ValueError as error:
        raise DiagnoseError(str(error)) from error
    lines, files = list(found.lines), list(found.files)
    selection = _read_json(run_dir / CONFIG).get("prior_selection")
    if isinstance(selection, dict):
        metric = str(selection.get("metric", "distance"))
        try:
            figure = selection_curves({metric: selection})
        except ValueError as error:
            raise DiagnoseError(f"{run_dir / CONFIG}: prior_selection: {error}") from error
        files.append(plots.save(figure, out / "prior_selection.png"))
        candidates = ", ".join(map(str, selection["candidates"]))
        lines += [
            "",
            "## Prior scale",
            "",
            f"Chosen by {metric.upper()} among {candidates}: {selection.get('chosen')}, the "
            "candidate whose prior-predictive outputs lie closest to the training data.",
            "",
            "![prior selection](prior_selection.png)",
        ]
    report = atomic.write_text(out / REPORT, "\n".join(lines) + "\n")
    return Diagnosis("sample", run_dir, out, files=[report, *files], verdict=found.verdict)


def diagnose(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    num_points: int = 500,
    say: Callable[[str], None] | None = None,
) -> Diagnosis:
    """Diagnose the run in ``run_dir`` (``pvae train``, ``pvae compare`` or ``pvae sample``)
    and write ``diagnostics.md`` and the figures into ``out_dir`` (default: ``run_dir``; for a
    compare run, one subfolder per bound and a summary on top).

    :param num_points: test points the diagnostics use (the first ones).
    :param say: called with one line per diagnosed bound (compare runs), or None.
    :raises DiagnoseError: a missing, foreign or unreadable run folder, or a checkpoint that
        does not match the model rebuilt from the configuration.
    """
    if num_points < 1:
        raise DiagnoseError(f"num_points must be >= 1, got {num_points}")
    run_dir = Path(run_dir)
    sampled = runs.recorded_command(run_dir) == "sample"
    kind = "sample" if sampled else _kind(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiagnoseError(f"cannot write to {out}: {error}") from error
    if sampled:
        return _diagnose_sample(run_dir, out)
    if kind == "train":
        return _diagnose_train(run_dir, out, num_points)
    return _diagnose_compare(run_dir, out, num_points, say)

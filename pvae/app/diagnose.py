"""``pvae diagnose``: latent diagnostics of a trained run folder.

:func:`diagnose` reads a folder written by ``pvae train`` (``config.json`` and
``checkpoint.pt``) or by ``pvae compare`` (``results.json`` and one folder per bound, each with
its ``checkpoint.pt``), rebuilds the dataset and the model from the recorded configuration
(:mod:`pvae.data`, :data:`pvae.registry.MODELS`), loads the trained parameters
(:func:`pvae.load_checkpoint`, ``weights_only=True``) and writes, next to the run (or into
``out_dir``), every file atomically:

- ``diagnostics.md``: the collapse verdict, a table per latent dimension (mean KL, activity,
  collapsed, relevance score and rank), the relevant set and the figures;
- ``kl_per_dim.png`` and ``activity.png`` (:func:`pvae.diagnostics.collapse_report`, Dang et
  al. 2024), ``relevance.png`` (:func:`pvae.diagnostics.latent_relevance`, Saha et al. 2025);
- ``traversals.png``: for the three most relevant dimensions, the decoded mean of p(x | z)
  when that dimension moves from -3 to +3 around the posterior mean of the first test point
  and the others stay at it (one row per dimension for images; one panel of lines per
  dimension otherwise).

For a compare run each bound is diagnosed into its own subfolder and a top-level
``diagnostics.md`` summarises them all. The diagnostics use the first ``num_points`` test
points and are seeded with the run's seed (the global random state is left as found); the
Pyro parameter store is cleared and left holding the last model diagnosed.

Problems with the folder (missing, foreign, unreadable or not matching the rebuilt model)
raise :class:`DiagnoseError`, whose message names what is missing and what the folder holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from matplotlib.figure import Figure
from pyro.nn import PyroModule

from pvae import compare, data, plots
from pvae.diagnostics import CollapseReport, LatentRelevance, collapse_report, latent_relevance
from pvae.diagnostics.figures import activity_bars, kl_bars, relevance_curve
from pvae.registry import MODELS, parse_bound
from pvae.train import CHECKPOINT, _discover_params, load_checkpoint

__all__ = [
    "FILES",
    "DiagnoseError",
    "Diagnosis",
    "LoadedRun",
    "diagnose",
    "load_parameters",
    "load_run",
    "traversals",
]

CONFIG = "config.json"
RESULTS = "results.json"
REPORT = "diagnostics.md"
FIGURES = ("kl_per_dim.png", "activity.png", "relevance.png", "traversals.png")
FILES = (REPORT, *FIGURES)
TRAVERSAL_DIMS = 3
TRAVERSAL_RANGE = 3.0
TRAVERSAL_STEPS = 9

_BINARIZE = {"dynamic": "dynamic", "static": "static", "none": None}


class DiagnoseError(ValueError):
    """The run folder cannot be diagnosed; the message says why (the CLI exits with 2)."""


@dataclass
class Diagnosis:
    """What :func:`diagnose` returns.

    ``kind``: "train" or "compare"; ``files``: the paths written; ``verdict``: the collapse
    verdict (a train run; a compare run: one line per bound); ``collapse`` and ``relevance``:
    the diagnostics of a train run (None for a compare run); ``bounds``: for a compare run,
    the :class:`Diagnosis` of each bound by label (None where the bound was skipped).
    """

    kind: str
    run_dir: Path
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    verdict: str = ""
    collapse: CollapseReport | None = None
    relevance: LatentRelevance | None = None
    bounds: dict[str, Diagnosis | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.out_dir / REPORT


# ---------------------------------------------------------------------------------------------
# Reading a run folder
# ---------------------------------------------------------------------------------------------


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
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names)} entries in all)"
    return f"it holds {shown}"


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
    if has_config and has_checkpoint:
        return "train"
    if has_config or has_checkpoint:
        missing = CHECKPOINT if has_config else CONFIG
        raise DiagnoseError(
            f"{run_dir} looks like a 'pvae train' run but {missing} is missing "
            f"({_contents(run_dir)})"
        )
    bound_folders = [p.name for p in sorted(run_dir.iterdir()) if (p / CHECKPOINT).is_file()]
    if bound_folders:
        raise DiagnoseError(
            f"{run_dir} looks like a 'pvae compare' run (bound folders "
            f"{', '.join(bound_folders)}) but {RESULTS} is missing: the comparison did not "
            f"finish ({_contents(run_dir)})"
        )
    raise DiagnoseError(
        f"{run_dir} is not a pvae run folder: {CONFIG} and {CHECKPOINT} (from 'pvae train') "
        f"and {RESULTS} (from 'pvae compare') are missing ({_contents(run_dir)})"
    )


def _load_dataset(name: str, seed: int, binarize: str | None, path: str | None) -> data.Splits:
    kwargs: dict[str, Any] = {"seed": seed}
    if binarize is not None:
        kwargs["binarize"] = _BINARIZE.get(binarize, binarize)
    if path is not None:
        kwargs["path"] = path
    try:
        return data.load(name, **kwargs)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as error:
        raise DiagnoseError(f"cannot rebuild the dataset {name!r}: {error}") from error


def _build_model(
    ds: data.Splits, model: str, z_dim: int, hidden: Sequence[int], net: str, likelihood: str
) -> PyroModule:
    try:
        return MODELS[model](ds, z_dim=z_dim, hidden=tuple(hidden), net=net, likelihood=likelihood)
    except (ValueError, KeyError, TypeError) as error:
        raise DiagnoseError(f"cannot rebuild the model {model!r}: {error}") from error


def load_parameters(model: PyroModule, ds: data.Splits, checkpoint: Path) -> dict[str, Any]:
    """Create the parameters of ``model`` in Pyro's parameter store (as :func:`pvae.fit` does)
    and copy the trained values of ``checkpoint`` into them; returns the checkpoint.

    :raises DiagnoseError: an unreadable checkpoint, or one whose parameters (names or shapes)
        do not match the model.
    """
    try:
        state = load_checkpoint(checkpoint)
    except (OSError, ValueError) as error:  # torch's messages span lines: keep the first
        raise DiagnoseError(str(error).strip().splitlines()[0]) from error
    x = ds.test[:2]
    try:
        params = _discover_params(model.model, model.guide, (x,))
    except (ValueError, RuntimeError) as error:
        raise DiagnoseError(
            f"cannot create the parameters of the rebuilt model: {error}"
        ) from error
    saved = state.get("params")
    if not isinstance(saved, Mapping):
        raise DiagnoseError(f"{checkpoint} holds no parameters")
    missing = sorted(set(saved) ^ set(params))
    if missing:
        raise DiagnoseError(
            f"{checkpoint} does not match the model rebuilt from its configuration: parameters "
            f"{', '.join(missing)} are in one but not the other"
        )
    wrong = [
        f"{name} {tuple(saved[name].shape)} vs {tuple(params[name].shape)}"
        for name in sorted(params)
        if not isinstance(saved[name], torch.Tensor) or saved[name].shape != params[name].shape
    ]
    if wrong:
        raise DiagnoseError(
            f"{checkpoint} does not match the model rebuilt from its configuration: shapes "
            f"differ (checkpoint vs model) for {'; '.join(wrong)}"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
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


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a ``pvae train`` run: data and model from ``config.json``, parameters from
    ``checkpoint.pt``. Clears Pyro's parameter store."""
    run_dir = Path(run_dir)
    if _kind(run_dir) != "train":
        raise DiagnoseError(f"{run_dir} is a 'pvae compare' run; use diagnose() for it")
    config = _read_json(run_dir / CONFIG)
    args = config.get("args")
    if config.get("command") != "train" or not isinstance(args, dict):
        raise DiagnoseError(f"{run_dir / CONFIG} is not the config of a 'pvae train' run")
    try:
        ds = _load_dataset(
            args["dataset"], int(args["seed"]), args.get("binarize"), args.get("data_path")
        )
        pyro.clear_param_store()
        model = _build_model(
            ds,
            args["model"],
            int(args["z_dim"]),
            args["hidden"],
            args["net"],
            args.get("likelihood") or ds.likelihood,
        )
    except KeyError as error:
        raise DiagnoseError(f"{run_dir / CONFIG} lacks the entry {error}") from error
    state = load_parameters(model, ds, run_dir / CHECKPOINT)
    metrics = None
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = None
    return LoadedRun(
        ds=ds,
        model=model,
        seed=int(args["seed"]),
        title=f"{args['model']} / {args.get('engine', '?')} on {args['dataset']}",
        command=["pvae", *config.get("argv", [])],
        checkpoint=state,
        metrics=metrics,
    )


def _flag(command: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in a recorded command line, or None."""
    for index, item in enumerate(command):
        if item == flag and index + 1 < len(command):
            return command[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------
# Diagnosing one trained model
# ---------------------------------------------------------------------------------------------


def _posterior_mean(guide: Callable, x: torch.Tensor, site: str) -> torch.Tensor:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x)
    fn: Any = trace.nodes[site]["fn"]
    try:
        return fn.mean.reshape(x.shape[0], -1)
    except (NotImplementedError, AttributeError):
        return fn.sample((64,)).mean(0).reshape(x.shape[0], -1)


def traversals(
    decode: Callable[[torch.Tensor], torch.Tensor],
    mu: torch.Tensor,
    dims: Sequence[int],
    image_shape: Sequence[int] | None,
    path: plots.PathLike | None = None,
    span: float = TRAVERSAL_RANGE,
    steps: int = TRAVERSAL_STEPS,
) -> Figure:
    """Decoded means as each of ``dims`` moves over ``mu_d + [-span, span]`` with the other
    dimensions at ``mu`` (``(D,)``): an image grid (one row per dimension) for images, one
    panel of lines (one per observed dimension) per latent dimension otherwise."""
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
        return plots.image_grid(torch.cat(rows), image_shape, nrow=steps, title=title, path=path)
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
    if path is not None:
        plots.save(fig, path)
    return fig


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _table(report: CollapseReport, relevance: LatentRelevance | None, site: str) -> str:
    head = "| site | dim | KL (nats) | activity | active | collapsed |"
    rule = "|---|---|---|---|---|---|"
    if relevance is not None:
        head += " relevance | rank |"
        rule += "---|---|"
    lines = [head, rule]
    for name, layer in report.layers.items():
        for d in range(layer.dims):
            row = (
                f"| {name} | {d} | {_number(float(layer.kl[d]))} | "
                f"{_number(float(layer.activity[d]))} | {'yes' if layer.active[d] else 'no'} | "
                f"{'yes' if layer.collapsed[d] else 'no'} |"
            )
            if relevance is not None:
                if name == site:
                    rank = relevance.ranking.index(d) + 1
                    mark = " (relevant)" if d in relevance.relevant else ""
                    row += f" {_number(float(relevance.scores[d]))} | {rank}{mark} |"
                else:
                    row += " | |"
            lines.append(row)
    return "\n".join(lines)


def _markdown(
    title: str,
    run_dir: Path,
    command: Sequence[str],
    facts: Sequence[str],
    report: CollapseReport,
    relevance: LatentRelevance | None,
    site: str,
    top: Sequence[int],
    notes: Sequence[str],
) -> str:
    lines = [f"# Diagnostics: {title}", "", f"Run folder: `{run_dir}`", ""]
    if command:
        lines += ["```", " ".join(command), "```", ""]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", "## Posterior collapse", "", "```", report.verdict, "```", ""]
    lines += [
        f"Thresholds: a dimension is active when Var_x E[z_d | x] exceeds "
        f"{report.activity_threshold:g}, and collapsed when its mean KL is below "
        f"{report.kl_threshold:g} nats (and, in a layer whose term is not a KL, it is inactive).",
        "",
        _table(report, relevance, site),
        "",
        "![KL per dimension](kl_per_dim.png)",
        "",
        "![activity per dimension](activity.png)",
        "",
    ]
    if relevance is not None:
        lines += [
            "## Latent relevance",
            "",
            f"{relevance.num_relevant} of {relevance.scores.numel()} dimensions of {site} "
            f"carry {100 * relevance.threshold:g}% of the decoder-Jacobian relevance score: "
            f"{', '.join(map(str, relevance.relevant)) or 'none'} "
            f"(ranking {', '.join(map(str, relevance.ranking))}).",
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
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _diagnose_model(
    model: PyroModule,
    ds: data.Splits,
    out_dir: Path,
    seed: int,
    num_points: int,
    title: str,
    run_dir: Path,
    command: Sequence[str],
    facts: Sequence[str],
) -> Diagnosis:
    x = ds.test[:num_points]
    files: list[Path] = []
    notes: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        report = collapse_report(model.model, model.guide, x)
        site = "z" if "z" in report.layers else next(iter(report.layers))
        relevance = None
        top: list[int] = []
        decode = getattr(model, "decode", None)
        if callable(decode):
            relevance = latent_relevance(model.guide, decode, x, site=site)
            top = relevance.ranking[: min(TRAVERSAL_DIMS, len(relevance.ranking))]
        else:
            notes.append("the model has no .decode: no relevance score and no traversals")
        kl_figure = kl_bars(report, threshold=report.kl_threshold)
        files.append(plots.save(kl_figure, out_dir / "kl_per_dim.png"))
        files.append(plots.save(activity_bars(report), out_dir / "activity.png"))
        if relevance is not None and callable(decode):
            files.append(plots.save(relevance_curve(relevance), out_dir / "relevance.png"))
            mu = _posterior_mean(model.guide, x[:1], site)[0]
            files.append(
                plots.save(traversals(decode, mu, top, ds.image_shape), out_dir / "traversals.png")
            )
    text = _markdown(title, run_dir, command, facts, report, relevance, site, top, notes)
    files.insert(0, plots.write_atomic(out_dir / REPORT, text))
    return Diagnosis(
        kind="train",
        run_dir=run_dir,
        out_dir=out_dir,
        files=files,
        verdict=report.verdict,
        collapse=report,
        relevance=relevance,
    )


def _train_facts(run: LoadedRun, num_points: int) -> list[str]:
    history = run.checkpoint.get("history") or []
    facts = [f"epochs trained: {int(run.checkpoint.get('epoch', -1)) + 1}"]
    if history:
        last = history[-1]
        facts.append(
            f"last epoch: train bound {_number(last.get('train_bound'), 5)}, valid bound "
            f"{_number(last.get('valid_bound'), 5)} nats"
        )
    test = (run.metrics or {}).get("test_log_likelihood")
    if isinstance(test, dict):
        facts.append(
            f"test log-likelihood {_number(test.get('mean'), 5)} +- "
            f"{_number(test.get('stderr'), 2)} nats (K={test.get('num_samples')})"
        )
    facts.append(f"diagnostics on the first {min(num_points, len(run.ds.test))} test points")
    return facts


def _diagnose_train(run_dir: Path, out_dir: Path, num_points: int) -> Diagnosis:
    run = load_run(run_dir)
    return _diagnose_model(
        run.model,
        run.ds,
        out_dir,
        run.seed,
        num_points,
        run.title,
        run_dir,
        run.command,
        _train_facts(run, num_points),
    )


# ---------------------------------------------------------------------------------------------
# A compare run
# ---------------------------------------------------------------------------------------------


def _diagnose_compare(
    run_dir: Path, out_dir: Path, num_points: int, say: Callable[[str], None] | None
) -> Diagnosis:
    results = _read_json(run_dir / RESULTS)
    config, rows = results.get("config"), results.get("results")
    if not isinstance(config, dict) or not isinstance(rows, list):
        raise DiagnoseError(f"{run_dir / RESULTS} is not the results of a 'pvae compare' run")
    command = [str(item) for item in results.get("command", [])]
    try:
        seed = int(config["seed"])
        ds = _load_dataset(
            config["dataset"], seed, _flag(command, "--binarize"), _flag(command, "--data-path")
        )
        ds = compare._subset(ds, config.get("num_train"), config.get("num_test"))
        build = {key: config[key] for key in ("model", "z_dim", "hidden", "net", "likelihood")}
    except KeyError as error:
        raise DiagnoseError(f"{run_dir / RESULTS} lacks the entry {error}") from error
    diagnosis = Diagnosis(kind="compare", run_dir=run_dir, out_dir=out_dir)
    for row in rows:
        label = str(row.get("bound"))
        folder = compare._folder(parse_bound(label)) if label else label
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
        pyro.clear_param_store()
        model = _build_model(
            ds,
            str(build["model"]),
            int(build["z_dim"]),
            build["hidden"],
            str(build["net"]),
            str(build["likelihood"] or ds.likelihood),
        )
        state = load_parameters(model, ds, checkpoint)
        facts = [
            f"bound {label}: {row.get('engine', '')}",
            f"epochs trained: {int(state.get('epoch', -1)) + 1}",
            f"test log-likelihood {_number(row.get('log_likelihood'), 5)} +- "
            f"{_number(row.get('log_likelihood_stderr'), 2)} nats "
            f"(K={config.get('ll_samples')})",
            f"diagnostics on the first {min(num_points, len(ds.test))} test points",
        ]
        if row.get("status") != "ok":
            facts.append(f"status: {row.get('status')} (the last good checkpoint)")
        child = _diagnose_model(
            model,
            ds,
            out_dir / folder,
            seed,
            num_points,
            f"{config['model']} / {label} on {config['dataset']}",
            run_dir / folder,
            command,
            facts,
        )
        diagnosis.bounds[label] = child
        diagnosis.files += child.files
        if say is not None:
            say(f"[{label}] {child.verdict.splitlines()[0]} -> {child.report}")
    summary = _compare_markdown(run_dir, command, config, rows, diagnosis)
    diagnosis.files.insert(0, plots.write_atomic(out_dir / REPORT, summary))
    diagnosis.verdict = "\n".join(
        f"{label}: {child.verdict.splitlines()[0] if child else diagnosis.skipped[label]}"
        for label, child in diagnosis.bounds.items()
    )
    return diagnosis


def _compare_markdown(
    run_dir: Path,
    command: Sequence[str],
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    diagnosis: Diagnosis,
) -> str:
    lines = [
        f"# Diagnostics: {config.get('model')} on {config.get('dataset')}, {len(rows)} bounds",
        "",
        f"Run folder: `{run_dir}`",
        "",
    ]
    if command:
        lines += ["```", " ".join(command), "```", ""]
    lines += [
        "| bound | log p(x) | verdict | dims in use | KL (nats) | relevant dims | report |",
        "|---|---|---|---|---|---|---|",
    ]
    by_label = {str(row.get("bound")): row for row in rows}
    for label, child in diagnosis.bounds.items():
        ll = _number(by_label.get(label, {}).get("log_likelihood"), 5)
        if child is None or child.collapse is None:
            lines.append(f"| {label} | {ll} | skipped: {diagnosis.skipped.get(label)} | | | | |")
            continue
        verdict = child.verdict.splitlines()[0].removeprefix("Verdict: ").rstrip(".")
        layers = child.collapse.layers.values()
        used = sum(layer.dims - len(layer.collapsed_dims) for layer in layers)
        dims = sum(layer.dims for layer in layers)
        kl = sum(float(layer.kl.sum()) for layer in layers)
        relevant = (
            ", ".join(map(str, child.relevance.relevant)) if child.relevance is not None else "n/a"
        )
        link = f"[{child.out_dir.name}/{REPORT}]({child.out_dir.name}/{REPORT})"
        lines.append(
            f"| {label} | {ll} | {verdict} | {used}/{dims} | {_number(kl)} | {relevant} | {link} |"
        )
    lines.append("")
    for label, child in diagnosis.bounds.items():
        if child is not None:
            lines += [f"## {label}", "", "```", child.verdict, "```", ""]
            lines += [f"![KL per dimension, {label}]({child.out_dir.name}/kl_per_dim.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def diagnose(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    num_points: int = 500,
    say: Callable[[str], None] | None = None,
) -> Diagnosis:
    """Diagnose the run in ``run_dir`` (``pvae train`` or ``pvae compare``) and write
    ``diagnostics.md`` and the figures into ``out_dir`` (default: ``run_dir``; for a compare
    run, one subfolder per bound and a summary on top).

    :param num_points: test points the diagnostics use (the first ones).
    :param say: called with one line per diagnosed bound (compare runs), or None.
    :raises DiagnoseError: a missing, foreign or unreadable run folder, or a checkpoint that
        does not match the model rebuilt from the configuration.
    """
    if num_points < 1:
        raise DiagnoseError(f"num_points must be >= 1, got {num_points}")
    run_dir = Path(run_dir)
    kind = _kind(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiagnoseError(f"cannot write to {out}: {error}") from error
    if kind == "train":
        return _diagnose_train(run_dir, out, num_points)
    return _diagnose_compare(run_dir, out, num_points, say)

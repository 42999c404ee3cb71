"""The report of ``pvae compare``: the tables (one row per cell, or per bound over seeds),
``results.md``, ``results.json``, ``results.csv`` and the four plots, built from the rows
that the cells wrote (:meth:`pvae.app.compare.BoundResult.to_json`).

Where the data set knows its exact log p(x) (``linear-gaussian``, ``lds``), every row carries
``exact_log_likelihood`` (the mean over the same test points) and the tables show it beside
the estimates, with each estimate's gap to it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

import pvae
from pvae import atomic, plots, tracking

__all__ = [
    "extra_metrics",
    "format_seed_table",
    "format_table",
    "metrics_csv",
    "summarize",
    "summary_line",
    "write",
]

Row = Mapping[str, Any]

NUMBERS = (  # a cell's numbers, in the order of results.csv
    *("log_likelihood", "log_likelihood_stderr", "delta_log_likelihood", "delta_stderr"),
    *("elbo", "iwae_64", "inference_gap", "active_units", "latent_dims", "snr_guide"),
    *("snr_model", "seconds_per_epoch", "train_bound", "valid_bound", "yardstick"),
    *("train_seconds", "yardstick_seconds", "eval_seconds", "peak_memory_mb"),
)
EXACT = "exact_log_likelihood"
PLOTS = ("learning_curves.png", "log_likelihood.png", "snr.png", "ll_vs_k.png")
FILES = ("results.md", "results.json", "results.csv", *PLOTS)
"""The files :func:`write` writes."""
_KNOWN = {"bound", "engine", "status", "history", "reference", "seed", "folder", "run", "ll_vs_k"}
_KNOWN |= {*NUMBERS, EXACT}
_CSV_COLUMNS = ["bound", "seed", "folder", "engine", "status", *NUMBERS, "reference"]
WITHIN_NOISE = 2.0  # a mean Δ within this many sd of the per-seed Δ is "within seed noise"
ELBO_SAMPLES, IWAE_SAMPLES = 16, 64  # the test ELBO's particles; the IWAE-64 column
_EXTRA_NOTES = {
    "imputation_mse": "**imputation_mse**: mean squared error per element of the model's "
    "imputation at held-out frames (the missing test frames against the clean truth where the "
    "dataset has it, else randomly hidden observed frames); **imputation_mse_mean_frame**: "
    "the same for the mean observed frame (a baseline without dynamics); "
    "**held_out_frames**: how many frames were scored.",
}


# -- Numbers as text -----------------------------------------------------------------------


def _text(value: Any, spec: str = ".2f") -> str:
    """A number as text: an int as it is, a float by the format ``spec``; "n/a" for None,
    NaN, infinity or anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:{spec}}"


def _pm(row: Row, key: str, digits: int = 2, spread: str = "_sd") -> str:
    """``mean ± spread`` of ``row[key]`` and ``row[key + spread]``."""
    mean = row.get(key)
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {_text(row.get(f'{key}{spread}'), f'.{digits}f')}"


def _gap(row: Row, key: str) -> str:
    """``exact - row[key]`` in nats (how far the estimate lies below the truth)."""
    exact, value = row.get(EXACT), row.get(key)
    if exact is None or value is None or not math.isfinite(value):
        return "n/a"
    return f"{exact - value:.2f}"


def extra_metrics(results: Sequence[Row]) -> list[str]:
    """The names of the model's own metrics in ``results``, in order of first appearance:
    the table's and the CSV's last columns."""
    names: list[str] = []
    for result in results:
        names += [key for key in result if key not in _KNOWN and key not in names]
    return names


def _has_exact(rows: Sequence[Row]) -> bool:
    return any(row.get(EXACT) is not None for row in rows)


# -- Tables --------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (sequences of cells; an empty cell is one
    space), without a trailing newline."""

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return "\n".join([line(header), "|" + "|".join(["---"] * len(header)) + "|", *map(line, rows)])


def _head(rows: Sequence[Row], ll_samples: int | None, unit: str | None, delta: str) -> list[str]:
    """The first columns of both tables: the estimate (with the exact value beside it where
    known) and the paired Δ to the reference."""
    reference = next((r.get("reference") for r in rows if r.get("reference")), None)
    k = f" (K={ll_samples})" if ll_samples else ""
    per = f" per {unit}" if unit else ""
    exact = ["exact log p(x)", "exact - log p(x)", "exact - ELBO"] if _has_exact(rows) else []
    return [f"test log p(x){per}{k}", *exact, f"{delta} vs {reference}" if reference else delta]


def _exact_cells(row: Row, rows: Sequence[Row]) -> list[str]:
    if not _has_exact(rows):
        return []
    return [_text(row.get(EXACT)), _gap(row, "log_likelihood"), _gap(row, "elbo")]


def _delta(row: Row, spread: str) -> str:
    if row["bound"] == row.get("reference"):
        return "reference"
    return f"{row['delta_log_likelihood']:+.2f} ± {_text(row.get(spread))}"


def format_table(
    results: Sequence[Row], ll_samples: int | None = None, unit: str | None = None
) -> str:
    """The results as a markdown table (one row per cell); ``unit``: what one datapoint is
    (``"sequence"``: log p(x) is per sequence). The model's own metrics come last."""
    extras = extra_metrics(results)
    header = ["bound", "trains", *_head(results, ll_samples, unit, "Δ"), "ELBO", "IWAE-64"]
    header += ["gap", "active units", "SNR guide", "SNR model", "s/epoch", "train s", "eval s"]
    header += ["peak MB", *extras]
    lines = []
    for r in results:
        cells = [r.get("run") or r["bound"], r["engine"]]
        if r["status"] != "ok":
            lines.append([*cells, r["status"].split(":")[0], *["n/a"] * (len(header) - 3)])
            continue
        cells += [_pm(r, "log_likelihood", spread="_stderr"), *_exact_cells(r, results)]
        cells += [_delta(r, "delta_stderr"), _text(r["elbo"]), _text(r["iwae_64"])]
        cells += [_text(r["inference_gap"]), f"{r['active_units']}/{r['latent_dims']}"]
        cells += [_text(r["snr_guide"], ".3g"), _text(r["snr_model"], ".3g")]
        cells += [_text(r.get(key), ".1f") for key in ("seconds_per_epoch", "train_seconds")]
        cells += [_text(r.get("eval_seconds"), ".1f"), _text(r.get("peak_memory_mb"), ".0f")]
        lines.append([*cells, *(_text(r.get(name), ".3g") for name in extras)])
    return markdown_table(header, lines)


def format_seed_table(
    summary: Sequence[Row], ll_samples: int | None = None, unit: str | None = None
) -> str:
    """:func:`summarize`'s rows as a markdown table: mean ± sd over seeds of every number,
    the per-seed paired Δ to the reference (mean ± sd over seeds) and whether that
    difference is within seed noise."""
    skip = ("seeds", "within_seed_noise", "delta_sd")
    extras = [k for k in extra_metrics(summary) if not k.endswith("_sd") and k not in skip]
    header = ["bound", "trains", "seeds", *_head(summary, ll_samples, unit, "paired Δ")]
    header += ["within seed noise", "ELBO", "IWAE-64", "gap", "active units", "SNR guide"]
    header += ["SNR model", "s/epoch", "train s", "eval s", *extras]
    lines = []
    for r in summary:
        if not r["seeds"]:
            lines.append([r["bound"], r["engine"], "0", r["status"], *["n/a"] * (len(header) - 4)])
            continue
        noise = r.get("within_seed_noise")
        cells = [r["bound"], r["engine"], ",".join(str(seed) for seed in r["seeds"])]
        cells += [_pm(r, "log_likelihood"), *_exact_cells(r, summary), _delta(r, "delta_sd")]
        cells += ["n/a" if noise is None else ("yes" if noise else "no")]
        cells += [_pm(r, key) for key in ("elbo", "iwae_64", "inference_gap")]
        cells += [f"{_pm(r, 'active_units', 1)}/{r['latent_dims']:.0f}"]
        cells += [_text(r.get("snr_guide"), ".3g"), _text(r.get("snr_model"), ".3g")]
        cells += [_text(r.get(k), ".1f") for k in ("seconds_per_epoch", "train_seconds")]
        cells += [_text(r.get("eval_seconds"), ".1f"), *(_pm(r, name, 3) for name in extras)]
        lines.append(cells)
    return markdown_table(header, lines)


def _mean_sd(values: Sequence[Any]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value) of the finite values."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def _summary_row(bound: str, rows: Sequence[Row], numeric: Sequence[str]) -> dict[str, Any]:
    good = [r for r in rows if r["status"] == "ok"]
    failed = len(rows) - len(good)
    row: dict[str, Any] = {
        "bound": bound,
        "engine": rows[0]["engine"],
        "status": "ok" if not failed else f"failed: {failed}/{len(rows)} seeds",
        "seeds": [r["seed"] for r in good],
        "reference": rows[0].get("reference"),
    }
    if not good:
        row["status"] = f"failed: {rows[0]['status'].split(':')[0]} ({len(rows)} seeds)"
    for key in numeric:
        values = [r.get(key) for r in good]
        if any(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            row[key], row[f"{key}_sd"] = _mean_sd(values)
    row["delta_sd"] = row.pop("delta_log_likelihood_sd", math.nan)
    spread = row["delta_sd"]  # NaN with one seed; the reference has no Δ of its own
    noise = abs(row.get("delta_log_likelihood", math.nan)) < WITHIN_NOISE * spread
    row["within_seed_noise"] = (
        noise if bound != row["reference"] and math.isfinite(spread) else None
    )
    curves = [r.get("ll_vs_k") or {} for r in good]
    ks = list(dict.fromkeys(k for curve in curves for k in curve))
    row["ll_vs_k"] = {k: _mean_sd([c.get(k, math.nan) for c in curves])[0] for k in ks}
    return row


def summarize(results: Sequence[Row]) -> list[dict[str, Any]]:
    """One row per bound from the rows of the cells (one per bound and seed): every number
    as its mean over the seeds that trained (``key``) and their sample standard deviation
    (``key_sd``); ``delta_log_likelihood`` is the mean of the per-seed paired Δ to the
    reference bound and ``delta_sd`` their sd; ``within_seed_noise`` is True when
    ``|mean Δ|`` < :data:`WITHIN_NOISE` x ``delta_sd`` (None for the reference, or with fewer
    than two seeds); ``ll_vs_k`` holds the mean over seeds at each K; ``seeds`` the seeds
    that trained and ``status`` "ok" or how many failed."""
    numeric = [k for k in (*NUMBERS, EXACT, *extra_metrics(results)) if k != "delta_stderr"]
    order = dict.fromkeys(r["bound"] for r in results)
    return [
        _summary_row(bound, [r for r in results if r["bound"] == bound], numeric) for bound in order
    ]


def summary_line(result: Row, ll_samples: int, several: bool = False) -> str:
    """One cell's result in a line (printed as each cell finishes)."""
    tag = f"{result['bound']} seed {result['seed']}" if several else result["bound"]
    if result["status"] != "ok":
        return f"[{tag}] {result['status']}"
    exact = result.get(EXACT)
    return (
        f"[{tag}] test log p(x) {result['log_likelihood']:.2f} +- "
        f"{result['log_likelihood_stderr']:.2f} (K={ll_samples})"
        + (f", exact {exact:.2f}" if exact is not None else "")
        + f", ELBO {result['elbo']:.2f}, gap {result['inference_gap']:.2f}, active units "
        f"{result['active_units']}/{result['latent_dims']}, SNR guide "
        f"{result['snr_guide']:.3g} model {result['snr_model']:.3g}, "
        f"{result['seconds_per_epoch']:.1f} s/epoch"
        + "".join(f", {name} {_text(result.get(name), '.3g')}" for name in extra_metrics([result]))
    )


def csv_text(results: Sequence[Row]) -> str:
    """``results.csv``: one row per cell, empty cells for missing or non-finite numbers."""
    exact = [EXACT] if _has_exact(results) else []
    columns = [*_CSV_COLUMNS, *exact, *extra_metrics(results)]

    def cell(value: Any) -> Any:
        missing = value is None or (isinstance(value, float) and not math.isfinite(value))
        return "" if missing else value

    return _csv(columns, [{key: cell(result.get(key)) for key in columns} for result in results])


def _csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """A CSV text of ``rows`` under the header ``columns`` (lines end in a newline)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


HISTORY = ["epoch", "train_bound", "valid_bound", "seconds", "steps"]
"""The per-epoch entries of ``pvae train``'s ``metrics.json`` and ``metrics.csv``."""


def metrics_csv(metrics: dict[str, Any]) -> str:
    """``metrics.csv`` of ``pvae train`` from its ``metrics.json`` ``metrics``: one row per
    epoch (the columns of :data:`HISTORY`); the test log-likelihood columns are filled on the
    last row."""
    rows = [{k: "" if v is None else v for k, v in record.items()} for record in metrics["history"]]
    test = metrics["test_log_likelihood"]
    if rows:
        rows[-1].update(test_log_likelihood=test["mean"], test_log_likelihood_stderr=test["stderr"])
    return _csv([*HISTORY, "test_log_likelihood", "test_log_likelihood_stderr"], rows)


# -- results.md ----------------------------------------------------------------------------


def _seeds(config: Row) -> list[int]:
    return list(config.get("seeds") or [config["seed"]])


def _tables(results: Sequence[Row], config: Row) -> str:
    unit, k = config.get("unit"), config["ll_samples"]
    if len(_seeds(config)) > 1:
        per_seed = format_table(results, k, unit)
        return f"{format_seed_table(summarize(results), k, unit)}\n\nPer seed:\n\n{per_seed}"
    return format_table(results, k, unit)


def _intro(config: Row) -> str:
    seeds = _seeds(config)
    if len(seeds) > 1:
        listed = ", ".join(str(s) for s in seeds)
        trained, seed_text = f"once per bound and seed ({listed})", f"seeds {listed}"
    else:
        trained, seed_text = "once per bound", f"seed {config['seed']}"
    hidden = "-".join(str(width) for width in config["hidden"])
    return (
        f"{config['model']} ({config['net']} {hidden}, z_dim {config['z_dim']}, "
        f"{config['likelihood']} likelihood) trained {trained} for {config['epochs']} epochs "
        f"on {config['num_train']} points (batch {config['batch_size']}, Adam lr "
        f"{config['lr']:g}, {seed_text}), {config['particles']} samples of z per datapoint "
        f"and step for every bound; measured on {config['num_test']} test points; device "
        f"{config.get('device', 'cpu')}."
    )


def _seed_notes(config: Row) -> list[str]:
    if len(_seeds(config)) < 2:
        return []
    return [
        "**seeds**: every number of the first table is the mean ± sample sd (n-1) over the "
        "seeds; a seed sets the initial weights, the minibatch order and the evaluation's "
        "random numbers (the data and test points are the same for every seed).",
        "**paired Δ**: for each seed, the mean over the same test points of log p(x) minus "
        "the reference bound's log p(x) with that seed; then the mean ± sd of these per-seed "
        "Δ over the seeds. **within seed noise**: yes when |mean Δ| < "
        f"{WITHIN_NOISE:g} × sd of the per-seed Δ (the rule used here; with "
        f"{len(_seeds(config))} seeds it is a rough screen, not a test).",
    ]


def _yardstick_note(config: Row) -> str:
    yardstick = config.get("yardstick")
    if not yardstick:
        return (
            "no yardstick (`--yardstick none`): the learning curves are each bound's own objective."
        )
    return (
        f"**yardstick**: after every epoch each bound's model is evaluated with the same "
        f"estimator, {str(yardstick).upper().replace(':', '-')}, on the first "
        f"{config.get('yardstick_points')} validation points (no gradients, a fixed seed in a "
        "forked RNG: training is untouched); `learning_curves.png` plots it for every bound "
        "on one axis (left) next to each bound's own objective (right)."
    )


def _notes(results: Sequence[Row], config: Row, elapsed: float, cpu_seconds: float) -> str:
    exact = (
        ["**exact log p(x)**: the data set's own log p(x) of the same test points (its "
         "generating model), and each estimate's gap to it in nats."]
        if _has_exact(results)
        else []
    )  # fmt: skip
    extras = extra_metrics(results)
    own = [note for key, note in _EXTRA_NOTES.items() if key in extras]
    own = own or ([f"the model's own metrics: {', '.join(extras)}."] if extras else [])
    notes = [
        f"**test log p(x)**: importance-sampled with K={config['ll_samples']}, mean ± "
        "standard error over test points (nats; higher is better).",
        *exact,
        "**Δ**: the paired difference of log p(x) to the first bound on the same test points "
        "and random numbers, ± its standard error (the errors of the column before are "
        "mostly shared).",
        *_seed_notes(config),
        f"**ELBO**: {ELBO_SAMPLES} samples, analytic KL; **IWAE-64**: IWAE with "
        f"{IWAE_SAMPLES} samples; **gap**: log p(x) - ELBO, the inference gap.",
        "**active units**: latent dimensions with Var_x(E_q[z|x]) > 0.01 (Burda et al. 2016), "
        "over all latent layers; `pvae diagnose` reports the same number.",
        "**SNR**: the mean over parameter elements of \\|E g\\| / std g for each bound's own "
        f"gradient estimator, from {config['snr_repeats']} gradients on "
        f"{config['snr_points']} test points (Rainforth et al. 2018).",
        "**s/epoch**: training steps only; **train s**: the whole training (steps, validation, "
        "checkpoints; the yardstick's time is left out); **eval s**: every test-set number of "
        "the row (log p(x), ELBO, IWAE-64, active units, the model's metrics, SNR, log p(x) "
        f"against K); **peak MB**: {tracking.memory_kind(config.get('device', 'cpu'))}. Total wall "
        f"time {elapsed:.0f} s ({cpu_seconds:.0f} s CPU, torch threads: "
        f"{torch.get_num_threads()}).",
        _yardstick_note(config),
        "**log p(x) against K** (`ll_vs_k.png`, `ll_vs_k` in results.json): K in "
        f"{', '.join(str(k) for k in config.get('ll_ks', []))} on the first "
        f"{min(config.get('ll_k_points', 100), config['num_test'])} test points (the largest "
        "K is the table's estimate on those points): where the estimate stops rising, K is "
        "large enough.",
        *own,
    ]
    return "".join(f"- {note}\n" for note in notes)


def markdown(
    results: Sequence[Row],
    config: Row,
    command: Sequence[str],
    elapsed: float,
    cpu_seconds: float,
    env: Row,
) -> str:
    """``results.md``: the table(s), what each column means, the command, the configuration
    and the environment."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    settings = "\n".join(f"{key}: {value}" for key, value in config.items())
    return (
        f"# pvae compare: {config['dataset']}\n\n{_intro(config)}\n\n{_tables(results, config)}"
        f"\n\n{_notes(results, config, elapsed, cpu_seconds)}\nPlots: `learning_curves.png`, "
        f"`log_likelihood.png`, `snr.png`, `ll_vs_k.png`.\n\n## Command\n\n```\n"
        f"{' '.join(command)}\n```\n\n## Configuration\n\n```\n{settings}\n"
        f"pvae {pvae.__version__}, torch {torch.__version__}, pyro {pyro.__version__}, python "
        f"{platform.python_version()}\n```\n\n## Environment\n\n```\n"
        f"git commit: {env.get('git_commit')}\nversions: {versions}\n"
        f"platform: {env.get('platform')}\nCPU: {env.get('cpu')} ({env.get('cpu_count')} "
        f"cores), GPU: {env.get('gpu')}, torch threads: {env.get('torch_threads')}, device: "
        f"{env.get('device')}\n```\n"
    )


# -- Files ---------------------------------------------------------------------------------


def _plots(out: Path, results: Sequence[Row], summary: Sequence[Row], config: Row) -> None:
    several = len(_seeds(config)) > 1
    histories: dict[str, list[Any]] = {}
    for row in results:
        if row["status"] == "ok":
            histories.setdefault(row["bound"], []).append(row["history"])
    yardstick = config.get("yardstick")
    plots.compared_learning_curves(
        histories,
        yardstick=str(yardstick).upper().replace(":", "-") if yardstick else None,
        path=out / "learning_curves.png",
        title=f"{config['dataset']}" + (f", mean over seeds {config['seeds']}" if several else ""),
    )
    curves = {r["bound"]: {int(k): v for k, v in r["ll_vs_k"].items()} for r in summary}
    plots.ll_vs_k(
        {bound: curve for bound, curve in curves.items() if curve},
        path=out / "ll_vs_k.png",
        title=f"log p(x) against K, first {min(100, config['num_test'])} test points"
        + (" (mean over seeds)" if several else ""),
    )
    rows = summary if several else results

    def column(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]

    spread = "sd over seeds" if several else "standard error over test points"
    plots.comparison(
        [r["bound"] for r in rows],
        {
            f"log p(x), K={config['ll_samples']}": (
                column("log_likelihood"),
                column("log_likelihood_sd" if several else "log_likelihood_stderr"),
            ),
            f"IWAE-{IWAE_SAMPLES}": (column("iwae_64"), None),
            "ELBO": (column("elbo"), None),
        },
        ylabel="nats per test point",
        path=out / "log_likelihood.png",
        title=f"test set of {config['dataset']} ({config['num_test']} points)",
        note=f"error bars: ±1 {spread} (see the Δ column of results.md for paired differences)",
    )
    plots.comparison(
        [r["bound"] for r in rows],
        {"guide": (column("snr_guide"), None), "model": (column("snr_model"), None)},
        ylabel="gradient SNR, mean |E g| / std g",
        path=out / "snr.png",
        title=f"gradient signal-to-noise ratio, {config['particles']} particles",
        log_scale=True,
    )


def write(
    run_dir: str | os.PathLike[str],
    results: Sequence[Row],
    config: Row,
    command: Sequence[str],
    elapsed: float = math.nan,
    cpu_seconds: float = math.nan,
) -> None:
    """``results.md``, ``results.json`` (with the :func:`environment` block and, per bound,
    the :func:`summarize` rows), ``results.csv`` and the four plots, atomically."""
    out = Path(run_dir)
    env = tracking.environment(config.get("device", "cpu"))
    summary = summarize(results)
    text = markdown(results, config, command, elapsed, cpu_seconds, env)
    atomic.write_text(out / "results.md", text)
    plots.write_json(
        out / "results.json",
        {
            "pvae_version": pvae.__version__,
            "command": list(command),
            "config": dict(config),
            "elapsed_seconds": elapsed,
            "cpu_seconds": cpu_seconds,
            "threads": torch.get_num_threads(),
            "versions": env["versions"],
            "environment": env,
            "memory": tracking.memory_kind(config.get("device", "cpu")),
            "within_seed_noise_rule": f"|mean paired delta| < {WITHIN_NOISE:g} sd of the "
            "per-seed paired deltas",
            "results": [dict(r) for r in results],
            "summary": summary,
        },
    )
    atomic.write_text(out / "results.csv", csv_text(results))
    _plots(out, results, summary, config)

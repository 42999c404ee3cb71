"""``pvae compare``: variational bounds side by side on one dataset.

The same architecture is trained once per bound with the same seed (the same initial weights
and minibatches), data and budget: every bound draws ``particles`` samples of z per datapoint
and step (ELBO averages them, IWAE uses all P in one log-mean-exp, MIWAE/PIWAE split them into
M groups of K with M*K = P; see :mod:`pvae.app.registry`). Each trained pair is measured on
the test set (the columns are explained in ``results.md``, :mod:`pvae.app.report`):
``log_likelihood`` (importance sampling with K = ``ll_samples``, mean and standard error);
``delta_log_likelihood`` (the paired difference to the first bound, same test points and
random numbers); ``elbo`` (16 samples, analytic KL), ``iwae_64``, ``inference_gap`` (log p(x)
- ELBO); ``active_units`` (:func:`pvae.app.latent_activity`, as ``pvae diagnose``);
``snr_guide``/``snr_model`` (the gradient SNR of that bound's own estimator, Rainforth et al.
2018, from ``snr_repeats`` gradients on ``snr_points`` test points); the times and the peak
memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set);
``yardstick`` (IWAE-64 on the first 200 validation points after every epoch, no gradients, a
fixed seed in a forked RNG: :class:`pvae.train.EpochBound`); ``ll_vs_k`` (log p(x) with K in
:data:`LL_KS` up to ``ll_samples`` on the first 100 test points). With several ``seeds``
every bound is trained once per seed (folders ``iwae/seed-1``) and :func:`summarize` gives
the mean ± sd over seeds, flagging a Δ *within seed noise* when ``|mean Δ| < 2 sd``.

A comparison is a :class:`Plan` of independent cells (bound x seed), each its own run folder
trained and measured by :func:`run_cell` from the :class:`~pvae.app.runs.RunConfig` alone:
the cells run one after the other, in ``jobs`` local processes or as Ray tasks with the same
numbers, bit for bit. A finished cell leaves ``cell.json`` (its :class:`BoundResult` and
per-point log p(x)), which a resumed comparison keeps. :func:`compare` writes into
``run_dir`` (atomically) ``config.json``, the files of :data:`OUTPUTS` and one folder per
cell with ``pvae.fit``'s checkpoint, ``run.json`` and ``cell.json``.

Speed: Pyro's argument checks cost about half of an importance-weighted step, so training and
evaluation run with Pyro's validation off; the data are checked against the likelihood's
support once, up front. Budget: the defaults (5 bounds, 64 particles, MNIST-5k, a
784-200-200-50 MLP VAE, 10 epochs of batches of 20, K = 5000 on 500 test points) took 8.6
minutes with ``--threads 1`` on a shared 2-core machine (before the yardstick, about 12 s,
and log p(x) against K, about 2 s per bound, were added; two threads on busy cores ran 2 to
4 times slower than one); ``quick=True`` trains a smaller net for 2 epochs on a subset with
K = 100, in well under a minute. Explicit arguments win over either set of defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import data, evaluate, plots, tracking, validation
from pvae.app import report, runs
from pvae.app.arguments import parse_yardstick
from pvae.app.registry import MODELS, BoundSpec, parse_bound
from pvae.app.report import (
    ELBO_SAMPLES,
    EXACT,
    IWAE_SAMPLES,
    WITHIN_NOISE,
    format_seed_table,
    format_table,
    summarize,
)
from pvae.checkpoint import CHECKPOINT, fork_rng
from pvae.diagnostics import count_active, gradient_snr, latent_activity
from pvae.evaluate import as_tensors, num_items
from pvae.inference import ELBO, IWAE
from pvae.tracking import environment  # where a comparison ran (results.json)
from pvae.train import EpochBound, Run, TrainingDiverged
from pvae.validation import device as resolve_device  # the name the CLI tests read

__all__ = [
    "DEFAULT_BOUNDS",
    "DEFAULTS",
    "LL_KS",
    "QUICK",
    "BoundResult",
    "Cell",
    "Plan",
    "WITHIN_NOISE",
    "bound_folder",
    "check_support",
    "compare",
    "environment",
    "format_seed_table",
    "format_table",
    "parse_yardstick",
    "resolve_bounds",
    "resolve_device",
    "run_config",
    "settings",
    "summarize",
]

DEFAULT_BOUNDS = ("elbo", "iwae", "miwae", "ciwae", "piwae")
OUTPUTS = report.FILES
"""The files :func:`compare` writes into its run folder (besides one folder per bound)."""
Knobs = dict[str, Any]
# The budget knobs, without and with --quick (explicit arguments win over both).
DEFAULTS: Knobs = dict(epochs=10, z_dim=50, hidden=(200, 200), ll_samples=5000, snr_repeats=20)
QUICK: Knobs = dict(epochs=2, z_dim=10, hidden=(64,), ll_samples=100, snr_repeats=5)
# --quick also keeps the first points of each split (RunConfig.load_data): 500 training and
# 100 valid/test points, or on sequence data (a sequence holds T frames) these.
QUICK_SEQUENCES: Knobs = runs.QUICK_SEQUENCE_LIMITS
SNR_POINTS = 100  # test points of the fixed SNR batch
EVAL_BATCH = 100  # test points per call of the test ELBO and IWAE-64
# log p(x): 100 test points per call, evaluate.ROWS rows (points x particles) per vectorised
# run: larger runs are no faster on a CPU, each a fresh mmap that page-faults.
LL_BATCH = 100
LL_KS = (1, 10, 100, 1000, 5000)  # log p(x) against K: these K up to ll_samples
LL_K_POINTS = 100  # ... on the first 100 test points
YARDSTICK = "iwae:64"  # the common estimator evaluated after every epoch
YARDSTICK_POINTS = 200  # ... on the first 200 validation points
CELL = "cell.json"  # a finished cell's result, in its run folder
EXECUTORS = ("local", "ray")

ProgressFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def settings(quick: bool = False, **given: Any) -> Knobs:
    """The budget knobs of :data:`DEFAULTS` (or :data:`QUICK`), overridden by the ``given``
    values that are not None."""
    resolved = dict(QUICK if quick else DEFAULTS)
    unknown = set(given) - set(resolved)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(resolved)}")
    resolved.update({key: value for key, value in given.items() if value is not None})
    return resolved


def run_config(dataset: str, quick: bool = False, **values: Any) -> runs.RunConfig:
    """The :class:`~pvae.app.runs.RunConfig` of a comparison on ``dataset``: the budget knobs
    of :data:`DEFAULTS` (:data:`QUICK` when ``quick``) unless given, the batch size of Burda
    et al. (20), 64 particles, the yardstick :data:`YARDSTICK` and the other ``values`` (its
    fields, e.g. ``bounds=["elbo", "iwae"]``, ``seeds=[0, 1]``, ``model="hvae"``).

    Batches of 20 at lr 1e-3 as Burda et al.: at the same cost per epoch small batches reach
    a far better model in a short budget (MNIST-5k, 5 epochs, 64 particles: valid ELBO -145
    nats with batches of 25, -189 with batches of 100).
    """
    knobs = settings(quick, **{k: values.pop(k) for k in DEFAULTS if k in values})
    knobs["hidden"] = tuple(knobs["hidden"])
    given = {"batch_size": 20, "particles": 64, "yardstick": YARDSTICK, **knobs, **values}
    return runs.RunConfig(command="compare", dataset=dataset, quick=quick, **given)


def resolve_bounds(
    bounds: Sequence[str | BoundSpec], particles: int, inner: int | None = None
) -> list[BoundSpec]:
    """Parse and resolve each bound for a budget of ``particles`` samples per datapoint.

    :raises ValueError: for an unknown bound (naming the valid choices), M*K not equal to
        ``particles`` (naming both), or a bound given twice.
    """
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if not bounds:
        raise ValueError("no bounds to compare")
    specs: list[BoundSpec] = []
    for bound in bounds:
        spec = bound if isinstance(bound, BoundSpec) else parse_bound(bound)
        spec = spec.resolve(particles, inner)
        spec.build(particles)  # the engine's own checks, before any training
        if spec.label in [s.label for s in specs]:
            raise ValueError(f"bound {spec.label!r} is given twice")
        specs.append(spec)
    return specs


def check_support(model: PyroModule, ds: data.Splits) -> None:
    """Every split must lie in the support of ``model.likelihood`` (checked once, up front,
    without touching the global RNG).

    :raises ValueError: naming the split and the likelihood's support.
    """
    likelihood = getattr(model, "likelihood", None)
    if likelihood is None or not hasattr(likelihood, "check_support"):
        return
    for split in ("train", "valid", "test"):
        if isinstance(ds, data.SequenceSplits):  # (values, times, mask): the observed frames
            values, _, mask = getattr(ds, split)[:3]
            x = values[mask].reshape(-1, ds.x_dim)
        else:
            with torch.random.fork_rng(devices=[]):  # a dynamically binarised set draws pixels
                x = as_tensors(getattr(ds, split))[-1]  # a conditional model's y comes last
        likelihood.check_support(x, name=f"{ds.name} {split}")


def check_pairs(
    model: PyroModule, ds: data.Splits, specs: Sequence[BoundSpec], particles: int, batch_size: int
) -> None:
    """``pvae.fit``'s checks (:func:`pvae.check_fit`) of ``model`` with every bound's engine
    on ``ds``, before anything is trained or written: a model that cannot read the dataset's
    batches, or a bound whose engine does not apply to the model, is refused up front.

    :raises ValueError, TypeError: naming the bound.
    """
    for spec in specs:
        engine = spec.build(particles)
        try:
            pvae.check_fit(model.model, model.guide, ds.train, engine, batch_size, ds.valid)
        except TypeError as error:
            raise TypeError(f"bound {spec.label!r}: {error}") from error
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"bound {spec.label!r}: {error}") from error


def bound_folder(spec: BoundSpec, seed: int | None = None) -> str:
    """The subfolder of a compare run that holds one bound's checkpoint: ``miwae_8x8``, or
    ``miwae_8x8/seed-1`` for one seed of a run with several (``seed`` given)."""
    folder = spec.label.replace(":", "_")
    return folder if seed is None else f"{folder}/seed-{seed}"


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The plan: cells of (bound, seed)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One training of the comparison: ``bound`` (a resolved label) with ``seed``, in the
    run folder ``folder`` (relative to the comparison's)."""

    bound: str
    seed: int
    folder: str


@dataclass
class Plan:
    """What a comparison trains: every bound of ``bounds`` once per seed of ``seeds`` (the
    cells, bounds in order and seeds within each), run by ``executor`` (``"local"``: ``jobs``
    processes, 1 runs them in this process; ``"ray"``: one Ray task per cell)."""

    bounds: list[BoundSpec]
    seeds: list[int]
    jobs: int = 1
    executor: str = "local"

    def __post_init__(self) -> None:
        if not self.bounds:
            raise ValueError("no bounds to compare")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        validation.positive_int(self.jobs, "jobs")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")

    @classmethod
    def of(cls, config: runs.RunConfig, jobs: int = 1, executor: str = "local") -> Plan:
        """The plan of ``config``'s bounds (default :data:`DEFAULT_BOUNDS`) and seeds.

        :raises ValueError: see :func:`resolve_bounds`.
        """
        specs = resolve_bounds(config.bounds or DEFAULT_BOUNDS, config.particles, config.inner)
        return cls(specs, list(config.seeds or [config.seed]), jobs, executor)

    @property
    def several(self) -> bool:
        return len(self.seeds) > 1

    def cells(self) -> list[Cell]:
        return [
            Cell(spec.label, seed, bound_folder(spec, seed if self.several else None))
            for spec in self.bounds
            for seed in self.seeds
        ]


@dataclass
class BoundResult:
    """One cell's numbers (see the module docstring); NaN where the training failed
    (``status`` says why). ``metrics``: the model's own test metrics; ``history``: the
    per-epoch records of ``pvae.fit``; ``run``: the folder, with several seeds."""

    bound: str
    seed: int
    folder: str
    engine: str
    status: str = "ok"
    run: str | None = None
    log_likelihood: float = math.nan
    log_likelihood_stderr: float = math.nan
    elbo: float = math.nan
    iwae_64: float = math.nan
    inference_gap: float = math.nan
    active_units: int | float = math.nan
    latent_dims: int | float = math.nan
    snr_guide: float = math.nan
    snr_model: float = math.nan
    seconds_per_epoch: float = math.nan
    train_bound: float | None = math.nan
    valid_bound: float | None = math.nan
    yardstick: float | None = math.nan
    train_seconds: float = math.nan
    yardstick_seconds: float = math.nan
    eval_seconds: float = math.nan
    peak_memory_mb: float = math.nan
    exact_log_likelihood: float | None = None
    ll_vs_k: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    reference: str | None = None
    delta_log_likelihood: float = math.nan
    delta_stderr: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The row of ``results.json``: the fields, the model's metrics among them, ``run``
        only with several seeds and ``exact_log_likelihood`` only where the data set knows it."""
        row = dataclasses.asdict(self)
        row.update(row.pop("metrics"))
        return {k: v for k, v in row.items() if v is not None or k not in ("run", EXACT)}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> BoundResult:
        """The result of a row of :meth:`to_json` (a None number read back as NaN)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known: dict[str, Any] = {
            k: (math.nan if v is None and k in _NUMBERS else v) for k, v in row.items()
        }
        metrics = {k: v for k, v in known.items() if k not in names}
        return cls(**{k: v for k, v in known.items() if k in names}, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


def _yardstick_callback(
    model: PyroModule, valid: Any, yardstick: tuple[str, int], seed: int, device: torch.device
) -> EpochBound:
    """The epoch callback that records ``record["yardstick"]``: the common estimator (IWAE-K or
    ELBO-K) on ``valid`` with the fixed ``seed``; its ``seconds`` are not training time."""
    name, samples = yardstick
    engine = IWAE(samples) if name == "iwae" else ELBO(samples)
    return EpochBound(
        model.model, model.guide, valid, engine, seed, batch_size=EVAL_BATCH, module=model,
        device=device,
    )  # fmt: skip


def _epoch_line(tag: str, epochs: int, yardstick: str | None, record: Mapping[str, Any]) -> str:
    """The progress line of one epoch of the cell ``tag``."""
    valid, common = record.get("valid_bound"), record.get("yardstick")
    label = str(yardstick or "").upper().replace(":", "-")
    return (
        f"[{tag}] epoch {record['epoch'] + 1}/{epochs}: train {record['train_bound']:.3f}"
        + (f", valid {valid:.3f}" if valid is not None else "")
        + (f", {label} {common:.3f}" if common is not None else "")
        + f" nats ({record['seconds']:.1f} s)"
    )


def _fit_cell(
    config: runs.RunConfig,
    cell: Cell,
    ds: data.Splits,
    out: Path | None,
    say: ProgressFn | None,
    loggers: Sequence[Any] = (),
) -> tuple[PyroModule, Run, float]:
    """Train ``cell`` (resumed from its checkpoint where it has one); returns the model, its
    run and the seconds the yardstick took (not training)."""
    device = torch.device(config.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(cell.seed)  # the same initial weights for every bound
    model = config.build_model(ds).to(device)
    entry = MODELS[config.model]
    callbacks = entry.callbacks(model, ds) if entry.callbacks is not None else []
    yardstick = parse_yardstick(config.yardstick)
    timed: list[EpochBound] = []
    if yardstick is not None and ds.valid is not None:
        with fork_rng(device):  # a dynamically binarised set draws its pixels once, here
            torch.manual_seed(cell.seed)
            valid = tuple(t[:YARDSTICK_POINTS] for t in as_tensors(ds.valid))
        timed.append(_yardstick_callback(model, valid, yardstick, cell.seed, device))
        callbacks.append(timed[0])
    if say is not None:
        tag = cell.folder.replace("_", ":").replace("/seed-", " seed ")
        callbacks.append(
            lambda run, record: say(_epoch_line(tag, config.epochs, config.yardstick, record))
        )
    folder = out / cell.folder if out is not None else None
    run = pvae.fit(
        model.model,
        model.guide,
        ds.train,
        engine=config.build_engine(cell.bound),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        valid=ds.valid,
        seed=cell.seed,
        run_dir=folder,
        resume=folder is not None and (folder / CHECKPOINT).is_file(),
        progress=False,
        callbacks=[*callbacks, *(logger.epoch for logger in loggers)],
        step_callbacks=[logger.step for logger in loggers],
    )
    return model, run, sum(callback.seconds for callback in timed)


def _stderr(values: torch.Tensor) -> float:
    n = values.numel()
    return float(values.double().std() / math.sqrt(n)) if n > 1 else math.nan


def log_likelihood(
    model: PyroModule,
    test: Any,
    num_samples: int,
    batch_size: int = LL_BATCH,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`pvae.log_likelihood` of ``test``, ``(N,)`` nats, evaluated a tenth of the points
    (at most ``batch_size``) at a time, ``chunk_size`` particles per vectorised run (default:
    :data:`pvae.evaluate.ROWS` rows per run, 40 particles for 50 points; for the default VAE
    the same draws as the runs of 100 particles used before); with ``progress``, a bar on a
    terminal and otherwise (output piped to a file) a line on stderr at least every 10 s and
    after the last part."""
    n = num_items(test)
    step = max(1, min(batch_size, math.ceil(n / 10)))
    chunk = chunk_size if chunk_size is not None else max(1, evaluate.ROWS // step)
    tty = progress and sys.stderr.isatty()
    bar = tqdm(total=n, desc=f"log p(x), K={num_samples}", unit="point", disable=not tty)
    parts, began, said = [], time.perf_counter(), time.perf_counter()
    for start in range(0, n, step):
        part = pvae.log_likelihood(
            model.model, model.guide, runs.rows(test, start, start + step), num_samples=num_samples,
            batch_size=step, chunk_size=min(num_samples, chunk), progress=False,
        )  # fmt: skip
        parts.append(part)
        bar.update(part.shape[0])
        done, now = start + part.shape[0], time.perf_counter()
        if progress and not tty and (now - said >= 10.0 or done == n):
            print(f"log p(x), K={num_samples}: {done}/{n} points ({now - began:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            said = now
    bar.close()
    return torch.cat(parts)


def _evaluate(
    config: runs.RunConfig, cell: Cell, model: PyroModule, ds: data.Splits, progress: bool
) -> tuple[dict[str, Any], torch.Tensor]:
    """The table's numbers for one trained cell and its per-point log-likelihoods (the model
    in eval mode), with the model's own metrics and log p(x) against K."""
    seed, test, ll_samples = cell.seed, ds.test, int(config.ll_samples)
    entry = MODELS[config.model]
    model.eval()
    with fork_rng(torch.device(config.device)):
        torch.manual_seed(seed)  # the same random numbers for every bound
        ll = log_likelihood(model, test, ll_samples, progress=progress)
        torch.manual_seed(seed)
        elbo = pvae.evaluate_bound(model.model, model.guide, test, ELBO(ELBO_SAMPLES), EVAL_BATCH)
        iwae = pvae.evaluate_bound(model.model, model.guide, test, IWAE(IWAE_SAMPLES), EVAL_BATCH)
        units = count_active(latent_activity(model, test, seed, channels=entry.channels))
        torch.manual_seed(seed)
        metrics = entry.metrics(model, ds, "test", seed) if entry.metrics is not None else {}
        torch.manual_seed(seed)
        snr_batch = tuple(t[:SNR_POINTS] for t in as_tensors(test))
        engine = config.build_engine(cell.bound)
        snr = gradient_snr(
            model.model, model.guide, snr_batch, engine, num_repeats=int(config.snr_repeats or 2)
        )
        curve = _ll_vs_k(model, test, ll_samples, ll, seed)
    exact = data.exact_log_likelihood(ds)
    numbers = {
        "log_likelihood": float(ll.mean()),
        "log_likelihood_stderr": _stderr(ll),
        "elbo": float(elbo),
        "iwae_64": float(iwae),
        "inference_gap": float(ll.mean()) - float(elbo),
        "active_units": units[0],
        "latent_dims": units[1],
        "snr_guide": snr.guide,
        "snr_model": snr.model,
        "ll_vs_k": curve,
        "metrics": dict(metrics),
        "exact_log_likelihood": float(exact.double().mean()) if exact is not None else None,
    }
    return numbers, ll


def ll_ks(ll_samples: int) -> list[int]:
    """The K of the log p(x)-against-K curve: :data:`LL_KS` up to ``ll_samples``, and
    ``ll_samples`` itself (the table's estimate)."""
    return sorted({k for k in LL_KS if k < ll_samples} | {ll_samples})


def _ll_vs_k(
    model: PyroModule, test: Any, largest: int, ll: torch.Tensor, seed: int
) -> dict[str, float]:
    """log p(x) by importance sampling with each K of :func:`ll_ks`, the mean over the first
    :data:`LL_K_POINTS` test points, ``{str(K): nats}``. The largest K reuses the table's
    per-point estimates ``ll``; every other K is drawn with the fixed ``seed``."""
    points = min(LL_K_POINTS, ll.shape[0])
    subset = runs.rows(test, 0, points)
    curve: dict[str, float] = {}
    for k in ll_ks(largest):
        if k == largest:
            curve[str(k)] = float(ll[:points].double().mean())
            continue
        torch.manual_seed(seed)
        values = pvae.log_likelihood(
            model.model, model.guide, subset, num_samples=k, batch_size=LL_BATCH,
            chunk_size=min(k, max(1, evaluate.ROWS // LL_BATCH)), progress=False,
        )  # fmt: skip
        curve[str(k)] = float(values.double().mean())
    return curve


def run_cell(
    config: runs.RunConfig,
    cell: Cell,
    out: Path | None = None,
    progress: bool = False,
    ds: data.Splits | None = None,
    loggers: Sequence[Any] = (),
) -> tuple[BoundResult, list[float]]:
    """Train and measure one cell (its data loaded from ``config`` unless given ``ds``), with
    Pyro's validation off; with ``out``, its result is written to ``out/folder/cell.json``.
    Returns the result and the per-point test log-likelihoods (empty when it failed)."""
    device = torch.device(config.device)
    ds = ds if ds is not None else config.load_data().to(device)
    engine = parse_bound(cell.bound).describe(config.particles)
    run_name = cell.folder if "/seed-" in cell.folder else None  # one seed of several
    result = BoundResult(cell.bound, cell.seed, cell.folder, engine, run=run_name)
    say: ProgressFn | None = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scope = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    with pyro.validation_enabled(False), scope:
        try:
            began = time.perf_counter()
            model, run, spent = _fit_cell(config, cell, ds, out, say, loggers)
            train_seconds = time.perf_counter() - began - spent
            began = time.perf_counter()
            numbers, ll = _evaluate(config, cell, model, ds, progress)
        except TrainingDiverged as error:
            result.status = f"diverged: {error}"
            ll = torch.zeros(0)
        else:
            seconds = [float(record["seconds"]) for record in run.history]
            last = run.history[-1] if run.history else {}
            vars(result).update(numbers)
            result.seconds_per_epoch = sum(seconds) / len(seconds) if seconds else math.nan
            for key in ("train_bound", "valid_bound", "yardstick"):
                setattr(result, key, last.get(key))
            result.train_seconds, result.yardstick_seconds = train_seconds, spent
            result.eval_seconds = time.perf_counter() - began
            result.peak_memory_mb = tracking.peak_memory_mb(device)
            result.history = run.history
    per_point = [float(value) for value in ll.cpu()]
    if out is not None:
        plots.write_json(out / cell.folder / CELL, {"result": result.to_json(), "ll": per_point})
    return result, per_point


def read_cell(folder: Path) -> tuple[BoundResult, list[float]] | None:
    """A finished cell's result and per-point log-likelihoods from its ``cell.json``; None
    when the cell has not finished (or its file cannot be read)."""
    try:
        document = json.loads((folder / CELL).read_text())
        return BoundResult.from_json(document["result"]), [float(v) for v in document["ll"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------

Done = Callable[[Cell, BoundResult, list[float]], None]


def _worker(
    config: dict[str, Any], cell: Cell, out: str | None, threads: int
) -> tuple[BoundResult, list[float]]:
    """:func:`run_cell` in a worker process or Ray task (``threads`` torch threads)."""
    torch.set_num_threads(threads)
    folder = Path(out) if out is not None else None
    return run_cell(runs.RunConfig.from_json(config), cell, folder)


def _run_local(
    config: runs.RunConfig, cells: Sequence[Cell], jobs: int, out: Path | None, done: Done
) -> None:
    """The cells in ``jobs`` processes (spawned, each with its share of torch's threads)."""
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    folder = str(out) if out is not None else None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_worker, config.to_json(), cell, folder, threads): cell for cell in cells
        }
        for future in as_completed(futures):
            done(futures[future], *future.result())


def _run_ray(config: runs.RunConfig, cells: Sequence[Cell], out: Path | None, done: Done) -> None:
    """The cells as Ray tasks: on the cluster of ``RAY_ADDRESS`` when set (``ray.init(
    address="auto")``), else on a local Ray instance (one CPU, one torch thread per task)."""
    try:
        import ray
    except ImportError as error:
        raise ImportError('the ray executor needs Ray: pip install "pyro-vae[ray]"') from error
    if not ray.is_initialized():
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None)
    task = ray.remote(num_cpus=1)(_worker)
    folder = str(out) if out is not None else None
    pending = {task.remote(config.to_json(), cell, folder, 1): cell for cell in cells}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        done(pending.pop(ready[0]), *ray.get(ready[0]))


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

_NUMBERS = report.NUMBERS


def check(config: runs.RunConfig, plan: Plan, ds: data.Splits) -> None:
    """Refuse, before anything is trained or written, data outside the likelihood's support,
    a model that cannot read the data and a bound that does not apply to the model.

    :raises ValueError, TypeError: naming the bound.
    """
    for name, value, least in (
        ("batch_size", config.batch_size, 1),
        ("snr_repeats", config.snr_repeats, 2),
    ):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    parse_yardstick(config.yardstick)
    validation.device(config.device)
    pyro.clear_param_store()
    probe = config.build_model(ds)
    check_support(probe, ds)
    check_pairs(probe, ds, plan.bounds, config.particles, config.batch_size)


def compare(
    config: runs.RunConfig,
    plan: Plan | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    loggers: Callable[[str, Mapping[str, Any]], Sequence[Any]] | None = None,
    ds: data.Splits | None = None,
) -> list[BoundResult]:
    """Train ``config``'s model once per cell of ``plan`` (default: :meth:`Plan.of`
    ``config``) with the same data and budget, measure each, and (with ``run_dir``) write
    the report built from the cells' folders.

    A cell whose folder already holds its ``cell.json`` is not run again (an interrupted
    comparison continues with the unfinished cells; a cell with a checkpoint resumes from
    it). The cells are independent: run in ``plan.jobs`` processes or as Ray tasks they give
    the same numbers, bit for bit, as one after the other (with equal torch threads).

    :param config: the run (``command="compare"``, e.g. from :func:`run_config`); its
        ``bounds``, ``seeds``, ``yardstick``, ``snr_repeats``, ``device`` are the comparison's.
    :param progress: one line per epoch and per cell (and progress bars on a terminal).
    :param argv: the command line recorded in ``results.md``.
    :param loggers: experiment tracking, ``loggers(label, params)`` the loggers of one cell:
        they see its steps and epochs when the cells run in this process, its numbers always.
    :param ds: the data as ``config.load_data()`` gives them (loaded here when None; cells
        run in other processes load their own from ``config``).
    :returns: one :class:`BoundResult` per cell, bounds in order and seeds within each.
    :raises ValueError: bad bounds, or data outside the likelihood's support, before anything
        is trained.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    if config.snr_repeats is None:
        config.snr_repeats = settings(config.quick)["snr_repeats"]
    config.yardstick = None if config.yardstick == "none" else config.yardstick
    plan = plan if plan is not None else Plan.of(config)
    config.bounds, config.seeds = [s.label for s in plan.bounds], plan.seeds
    config.seed = plan.seeds[0]
    ds = ds if ds is not None else config.load_data()
    check(config, plan, ds)
    out = Path(run_dir) if run_dir is not None else None
    argv = list(argv) if argv is not None else _command(config)
    if out is not None:
        runs.write_config(out, config, ds, argv=argv)
    found = {cell: read_cell(out / cell.folder) for cell in plan.cells()} if out else {}
    finished = {cell: pair for cell, pair in found.items() if pair is not None}

    def open_loggers(cell: Cell) -> Sequence[Any]:
        name = f"{cell.bound}/seed-{cell.seed}" if plan.several else cell.bound
        params = {**config.to_json(), "seed": cell.seed, "bound": cell.bound}
        return loggers(name, params) if loggers else []

    def done(cell: Cell, result: BoundResult, ll: list[float], logged: Any = None) -> None:
        """Keep a cell's numbers, send them to its loggers (opened here when the cell ran in
        another process) and print its summary line."""
        finished[cell] = (result, ll)
        for logger in open_loggers(cell) if logged is None else logged:
            logger.log_metrics({k: v for k, v in result.to_json().items() if k in _NUMBERS})
            logger.close(failed=not result.ok)
        if progress:
            tqdm.write(report.summary_line(result.to_json(), config.ll_samples, plan.several))

    todo = [cell for cell in plan.cells() if cell not in finished]
    if plan.executor == "ray":
        _run_ray(config, todo, out, done)
    elif plan.jobs > 1 and len(todo) > 1:
        _run_local(config, todo, min(plan.jobs, len(todo)), out, done)
    else:
        on_device = ds.to(config.device)
        for cell in todo:
            logged = open_loggers(cell)
            done(cell, *run_cell(config, cell, out, progress, on_device, logged), logged)
    results = [finished[cell][0] for cell in plan.cells()]
    add_deltas(results, {(c.bound, c.seed): finished[c][1] for c in plan.cells()})
    if out is not None:
        elapsed, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        rows = [result.to_json() for result in results]
        report.write(out, rows, _report_config(config, ds), argv, elapsed, cpu_seconds)
    return results


def add_deltas(
    results: Sequence[BoundResult], per_point: Mapping[tuple[str, int], Sequence[float]]
) -> None:
    """Paired differences of log p(x) to the first bound that trained, seed by seed (the
    same test points and random numbers)."""
    trained = {key: torch.tensor(values) for key, values in per_point.items() if len(values)}
    reference = next((r.bound for r in results if (r.bound, r.seed) in trained), None)
    for result in results:
        result.reference = reference
        key, paired = (result.bound, result.seed), (str(reference), result.seed)
        if reference is None or key not in trained or paired not in trained:
            result.delta_log_likelihood = result.delta_stderr = math.nan
            continue
        diff = (trained[key] - trained[paired]).double()
        result.delta_log_likelihood = float(diff.mean())
        result.delta_stderr = _stderr(diff) if result.bound != reference else 0.0


# The configuration entries of results.json, in order: the run's, then the comparison's.
_CONFIG_KEYS = (
    *("bounds", "particles", "inner", "model", "model_options", "z_dim", "hidden", "net"),
    *("likelihood", "epochs", "batch_size", "lr", "seed", "seeds", "yardstick"),
)


def _report_config(config: runs.RunConfig, ds: data.Splits) -> dict[str, Any]:
    """The ``config`` block of ``results.json``."""
    values = config.to_json()
    result = {"dataset": ds.name, **{key: values[key] for key in _CONFIG_KEYS}}
    result.update(
        yardstick_points=YARDSTICK_POINTS,
        device=config.device,
        ll_samples=config.ll_samples,
        ll_ks=ll_ks(config.ll_samples),
        ll_k_points=LL_K_POINTS,
        snr_repeats=config.snr_repeats,
        snr_points=SNR_POINTS,
        quick=config.quick,
        num_train=num_items(ds.train),
        num_valid=num_items(ds.valid),
        num_test=num_items(ds.test),
    )
    if isinstance(ds, data.SequenceSplits):
        result["unit"] = "sequence"  # log p(x) per sequence
    return result


def _command(config: runs.RunConfig) -> list[str]:
    """The ``pvae compare`` command line equivalent to ``config``."""
    argv = ["pvae", "compare", "--dataset", config.dataset, "--bounds", ",".join(config.bounds)]
    keys = ("particles", "epochs", "model", "z_dim", "net", "likelihood", "batch_size", "lr")
    for key in (*keys, "seed", "hidden", "ll_samples", "snr_repeats"):
        value = getattr(config, key)
        text = ",".join(map(str, value)) if key == "hidden" else str(value)
        argv += [f"--{key.replace('_', '-')}", text]
    entry = MODELS[config.model]
    for option in entry.options:
        value = config.model_options.get(option.name)
        if value is not None:
            argv += [entry.flag(option), str(value)]
    if config.inner is not None:
        argv += ["--inner", str(config.inner)]
    if len(config.seeds) > 1:
        argv += ["--seeds", ",".join(str(seed) for seed in config.seeds)]
    argv += ["--yardstick", str(config.yardstick or "none")]
    if config.device != "cpu":
        argv += ["--device", config.device]
    return argv + (["--quick"] if config.quick else [])

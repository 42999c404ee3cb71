"""``pvae compare``: variational bounds side by side on one dataset.

The same architecture is trained once per bound (and seed) with the same initial weights,
minibatches, data and budget of ``particles`` samples of z per datapoint and step, then
measured on the test set (the columns are explained in ``results.md``, :mod:`pvae.app.report`).

A comparison is a :class:`Plan` of independent cells (bound x seed), each its own run folder.
A cell's work is :class:`Task` s run from the :class:`~pvae.app.runs.RunConfig` alone
(:func:`run_task`): its training, then its evaluation in pieces (:func:`evaluation_tasks`),
each seeded so that they run in this process, in ``jobs`` local processes or as Ray tasks
with the same numbers bit for bit (at equal torch threads per task). A finished task leaves
``task-<name>.json`` in its cell's folder, a finished cell its ``cell.json``; a resumed
comparison runs only the tasks left. Training and evaluation run with Pyro's validation off;
the data are checked against the likelihood's support once, up front.

The defaults (5 bounds, 64 particles, MNIST-5k, a 784-200-200-50 MLP VAE, 10 epochs of
batches of 20, K = 5000 on 500 test points) take about 540 s of CPU on an idle 2-core machine,
278-300 s of wall time with ``jobs="auto"``; ``quick=True`` trains a smaller net for 2 epochs
on a subset with K = 100. Explicit arguments win over either set of defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import data, evaluate, plots, tracking, validation
from pvae.app import report, runs
from pvae.app.registry import MODELS, BoundSpec, parse_bound, parse_yardstick
from pvae.app.report import (
    ELBO_SAMPLES,
    EXACT,
    IWAE_SAMPLES,
    WITHIN_NOISE,
    format_seed_table,
    format_table,
    summarize,
)
from pvae.app.runs import bound_folder
from pvae.checkpoint import CHECKPOINT, fork_rng, load_checkpoint
from pvae.diagnostics import count_active, gradient_snr, latent_activity
from pvae.evaluate import as_tensors, num_items
from pvae.inference import ELBO, IWAE
from pvae.protocol import param_split
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


# -- Arguments -----------------------------------------------------------------------------


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


# -- The plan: cells of (bound, seed) ------------------------------------------------------


def auto_jobs(cells: int, quick: bool = False) -> int:
    """``--jobs auto``: one process per core this process may use, at most one per cell; 1
    with ``quick`` (a smoke run's seconds of work cost less than starting the processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if quick else max(1, min(cores or 1, cells))


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
    def of(cls, config: runs.RunConfig, jobs: int | str = "auto", executor: str = "local") -> Plan:
        """The plan of ``config``'s bounds (default :data:`DEFAULT_BOUNDS`) and seeds, with
        ``jobs="auto"``: :func:`auto_jobs`.

        :raises ValueError: see :func:`resolve_bounds`.
        """
        specs = resolve_bounds(config.bounds or DEFAULT_BOUNDS, config.particles, config.inner)
        seeds = list(config.seeds or [config.seed])
        if jobs == "auto":
            jobs = auto_jobs(len(specs) * len(seeds), config.quick)
        return cls(specs, seeds, int(jobs), executor)

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
            k: (math.nan if v is None and k in report.NUMBERS else v) for k, v in row.items()
        }
        metrics = {k: v for k, v in known.items() if k not in names}
        return cls(**{k: v for k, v in known.items() if k in names}, metrics=metrics)


# -- One cell ------------------------------------------------------------------------------


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


def _tag(cell: Cell) -> str:
    """A cell as its progress lines name it: ``miwae:8x8`` or ``iwae seed 1``."""
    return cell.folder.replace("_", ":").replace("/seed-", " seed ")


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
        callbacks.append(
            lambda run, record: say(
                _epoch_line(_tag(cell), config.epochs, config.yardstick, record)
            )
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


def _estimate(
    model: PyroModule, x: Any, samples: int, points: int, chunk: int | None = None
) -> torch.Tensor:
    """:func:`pvae.log_likelihood` of ``x``, ``(N,)`` nats, ``points`` per call and ``chunk``
    particles per vectorised run (default: :data:`pvae.evaluate.ROWS` rows per run)."""
    chunk = chunk if chunk is not None else max(1, evaluate.ROWS // points)
    chunk_size = min(samples, chunk)
    return pvae.log_likelihood(
        model.model, model.guide, x, num_samples=samples, chunk_size=chunk_size, batch_size=points
    )


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
    tty = progress and sys.stderr.isatty()
    bar = tqdm(total=n, desc=f"log p(x), K={num_samples}", unit="point", disable=not tty)
    parts, began, said = [], time.perf_counter(), time.perf_counter()
    for start in range(0, n, step):
        part = _estimate(model, runs.rows(test, start, start + step), num_samples, step, chunk_size)
        parts.append(part)
        bar.update(part.shape[0])
        done, now = start + part.shape[0], time.perf_counter()
        if progress and not tty and (now - said >= 10.0 or done == n):
            print(f"log p(x), K={num_samples}: {done}/{n} points ({now - began:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            said = now
    bar.close()
    return torch.cat(parts)


def ll_ks(ll_samples: int) -> list[int]:
    """The K of the log p(x)-against-K curve: :data:`LL_KS` up to ``ll_samples``, and
    ``ll_samples`` itself (the table's estimate)."""
    return sorted({k for k in LL_KS if k < ll_samples} | {ll_samples})


def _ll_vs_k(model: PyroModule, test: Any, ks: Sequence[int], seed: int) -> dict[str, float]:
    """log p(x) by importance sampling with each K of ``ks``, the mean over the first
    :data:`LL_K_POINTS` test points, ``{str(K): nats}``, each drawn with the fixed ``seed``."""
    subset = runs.rows(test, 0, min(LL_K_POINTS, num_items(test)))
    curve: dict[str, float] = {}
    for k in ks:
        torch.manual_seed(seed)
        curve[str(k)] = float(_estimate(model, subset, k, LL_BATCH).double().mean())
    return curve


# -- Tasks: a cell's training, then its evaluation in pieces -------------------------------

Part = dict[str, Any]  # what a task returns: JSON values
Params = dict[str, torch.Tensor]  # a trained cell's parameters (unconstrained, by name)
Job = tuple["Task", "Params | None", str]  # a task, the trained parameters and their token
Done = Callable[["Task", Part, "Params | None"], list[Job]]


@dataclass(frozen=True)
class Task:
    """One piece of a cell's work: ``"train"``; ``"ll"``, log p(x) of the test points
    ``start`` to ``stop``; ``"measures"``, every other test number. Until the cell is
    finished its result is kept in ``task-<name>.json`` in the cell's folder."""

    cell: Cell
    kind: str
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"ll-{self.start}" if self.kind == "ll" else self.kind


def evaluation_tasks(cell: Cell, num_test: int) -> list[Task]:
    """The evaluation of a trained ``cell``: its measures, then log p(x) in chunks of a tenth
    of the ``num_test`` test points (at most :data:`LL_BATCH`)."""
    step = max(1, min(LL_BATCH, math.ceil(num_test / 10)))
    chunks = [Task(cell, "ll", a, min(a + step, num_test)) for a in range(0, num_test, step)]
    return [Task(cell, "measures"), *chunks]


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the log p(x) chunk from test point ``start`` of a cell seeded ``seed``: the
    same wherever and in whatever order the chunks run, and for every bound (paired Δ)."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


_LOADED: dict[str, Any] = {}  # this process's data (by configuration) and last rebuilt model


def _data(config: runs.RunConfig) -> data.Splits:
    """``config.load_data()`` on its device, loaded once per process and configuration."""
    key = json.dumps(config.to_json(), sort_keys=True)
    if _LOADED.get("data key") != key:
        _LOADED.update({"data key": key, "data": config.load_data().to(config.device)})
    return _LOADED["data"]


def _trained_model(
    config: runs.RunConfig, cell: Cell, ds: data.Splits, params: Params, token: str
) -> PyroModule:
    """``config``'s model of ``cell`` in eval mode with its trained ``params``, rebuilt once
    per process and ``token`` (one training)."""
    if _LOADED.get("token") != token:
        pyro.clear_param_store()
        pyro.set_rng_seed(cell.seed)
        model = config.build_model(ds).to(config.device)
        batch = tuple(t[:2] for t in as_tensors(ds.test))
        with warnings.catch_warnings():  # the training warned about the pair already
            warnings.simplefilter("ignore")
            pvae.checkpoint.load_parameters(model.model, model.guide, batch, {"params": params})
        _LOADED.update(token=token, model=model.eval())
    return _LOADED["model"]


def _train(
    config: runs.RunConfig,
    cell: Cell,
    ds: data.Splits,
    out: Path | None,
    say: ProgressFn | None,
    loggers: Sequence[Any],
) -> tuple[Part, Params | None]:
    """The training task: its history and seconds, and the trained parameters."""
    _LOADED.pop("token", None)  # the parameter store is about to change
    began = time.perf_counter()
    try:
        model, run, spent = _fit_cell(config, cell, ds, out, say, loggers)
    except TrainingDiverged as error:
        return {"status": f"diverged: {error}"}, None
    train_seconds = time.perf_counter() - began - spent
    batch = tuple(t[:2] for t in as_tensors(ds.test))
    with warnings.catch_warnings():  # fit has warned about the pair already
        warnings.simplefilter("ignore")
        model_params, guide_params = param_split(model.model, model.guide, batch)
    params = {**guide_params, **model_params}
    trained = {name: value.detach().cpu().clone() for name, value in params.items()}
    part = {"status": "ok", "history": run.history, "train_seconds": train_seconds,
            "yardstick_seconds": spent, "token": uuid.uuid4().hex}  # fmt: skip
    return part, trained


def _ll_chunk(config: runs.RunConfig, task: Task, model: PyroModule, ds: data.Splits) -> Part:
    """log p(x) with K = ``ll_samples`` of the test points of ``task``, ``{"ll": nats}``,
    seeded by :func:`chunk_seed`."""
    torch.manual_seed(chunk_seed(task.cell.seed, task.start))
    x = runs.rows(ds.test, task.start, task.stop)
    ll = _estimate(model, x, int(config.ll_samples), task.stop - task.start)
    return {"ll": [float(value) for value in ll.cpu()]}


def _measures(config: runs.RunConfig, task: Task, model: PyroModule, ds: data.Splits) -> Part:
    """Every test number but the table's log p(x), each drawn from ``manual_seed(seed)``: the
    test ELBO and IWAE-64, the active units, the model's own metrics, the gradient SNR and
    log p(x) with the K of :func:`ll_ks` below ``ll_samples``."""
    seed, test, entry = task.cell.seed, ds.test, MODELS[config.model]
    torch.manual_seed(seed)
    elbo = pvae.evaluate_bound(model.model, model.guide, test, ELBO(ELBO_SAMPLES), EVAL_BATCH)
    iwae = pvae.evaluate_bound(model.model, model.guide, test, IWAE(IWAE_SAMPLES), EVAL_BATCH)
    active, dims = count_active(latent_activity(model, test, seed, channels=entry.channels))
    torch.manual_seed(seed)
    metrics = entry.metrics(model, ds, "test", seed) if entry.metrics is not None else {}
    torch.manual_seed(seed)
    snr = gradient_snr(
        model.model, model.guide, tuple(t[:SNR_POINTS] for t in as_tensors(test)),
        config.build_engine(task.cell.bound), num_repeats=int(config.snr_repeats or 2),
    )  # fmt: skip
    return {
        "elbo": float(elbo), "iwae_64": float(iwae), "active_units": active, "latent_dims": dims,
        "snr_guide": snr.guide, "snr_model": snr.model, "metrics": dict(metrics),
        "ll_vs_k": _ll_vs_k(model, test, ll_ks(int(config.ll_samples))[:-1], seed),
    }  # fmt: skip


def run_task(
    config: runs.RunConfig,
    task: Task,
    ds: data.Splits,
    out: Path | None = None,
    trained: tuple[Params | None, str] = (None, ""),
    say: ProgressFn | None = None,
    loggers: Sequence[Any] = (),
) -> tuple[Part, Params | None]:
    """Run ``task`` with Pyro's validation off (an evaluation on the model rebuilt with the
    ``trained`` parameters and their token); returns its part, with its seconds, CPU seconds
    and peak memory, and after a training the trained parameters."""
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began, cpu = time.perf_counter(), time.process_time()
    scope = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    params: Params | None = None
    with pyro.validation_enabled(False), scope:
        if task.kind == "train":
            part, params = _train(config, task.cell, ds, out, say, loggers)
        else:
            trained_params, token = trained
            assert trained_params is not None, "an evaluation needs the trained parameters"
            model = _trained_model(config, task.cell, ds, trained_params, token)
            with fork_rng(device):
                part = (_ll_chunk if task.kind == "ll" else _measures)(config, task, model, ds)
    part.update(seconds=time.perf_counter() - began, cpu_seconds=time.process_time() - cpu,
                peak_memory_mb=tracking.peak_memory_mb(device))  # fmt: skip
    return part, params


def read_cell(folder: Path) -> tuple[BoundResult, list[float]] | None:
    """A finished cell's result and per-point log-likelihoods from its ``cell.json``; None
    when the cell has not finished (or its file cannot be read)."""
    try:
        document = json.loads((folder / CELL).read_text())
        ll = [math.nan if v is None else float(v) for v in document["ll"]]
        return BoundResult.from_json(document["result"]), ll
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


_MEASURES = ("elbo", "iwae_64", "active_units", "latent_dims", "snr_guide", "snr_model")


def _cell_result(
    config: runs.RunConfig, cell: Cell, parts: Mapping[str, Part], tasks: Sequence[Task]
) -> tuple[BoundResult, list[float]]:
    """A cell's result from the parts of its ``tasks`` (JSON values, as read back from its
    folder) and its per-point test log-likelihoods (empty when the training failed)."""
    engine = parse_bound(cell.bound).describe(config.particles)
    run_name = cell.folder if "/seed-" in cell.folder else None  # one seed of several
    train = parts["train"]
    if train["status"] != "ok":
        return BoundResult(
            cell.bound, cell.seed, cell.folder, engine, train["status"], run_name
        ), []
    per_point = [_number(v) for t in tasks if t.kind == "ll" for v in parts[t.name]["ll"]]
    ll, measures = torch.tensor(per_point), parts["measures"]  # float32, as estimated
    history = train["history"]
    last = history[-1] if history else {}
    evaluation = [parts[task.name] for task in tasks if task.kind != "train"]
    row = {
        "bound": cell.bound, "seed": cell.seed, "folder": cell.folder, "engine": engine,
        "run": run_name, **{key: measures[key] for key in _MEASURES},
        **measures["metrics"], "history": history,
        "log_likelihood": float(ll.mean()), "log_likelihood_stderr": _stderr(ll),
        "inference_gap": float(ll.mean()) - _number(measures["elbo"]),
        "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history) if history
        else None,
        **{key: last.get(key) for key in ("train_bound", "valid_bound", "yardstick")},
        "train_seconds": train["train_seconds"], "yardstick_seconds": train["yardstick_seconds"],
        "eval_seconds": sum(part["seconds"] for part in evaluation),
        "peak_memory_mb": max(_number(p["peak_memory_mb"]) for p in (train, *evaluation)),
    }  # fmt: skip
    row["ll_vs_k"] = {
        **measures["ll_vs_k"],
        str(config.ll_samples): float(ll[:LL_K_POINTS].double().mean()),
    }
    return BoundResult.from_json(row), per_point


@dataclass
class _Ledger:
    """The unfinished cells' parts, in memory and (with ``out``) in the cells' folders, and
    what follows each part: a trained cell's evaluation; a finished cell's ``cell.json`` and
    ``finish(cell, result, per_point)``."""

    config: runs.RunConfig
    ds: data.Splits
    out: Path | None
    finish: Callable[[Cell, BoundResult, list[float]], None]
    say: ProgressFn | None = None
    parts: dict[Cell, dict[str, Part]] = field(default_factory=dict)
    said: dict[Cell, float] = field(default_factory=dict)

    def start(self, cells: Sequence[Cell]) -> list[Job]:
        """The jobs of ``cells``: the trainings left first, then the evaluations left of the
        trained ones (their parameters from their checkpoints)."""
        trainings, evaluations = [], []
        for cell in cells:
            folder = self.out / cell.folder if self.out is not None else None
            found = sorted(folder.glob("task-*.json")) if folder is not None else []
            self.parts[cell] = {path.stem[5:]: json.loads(path.read_text()) for path in found}
            if "train" not in self.parts[cell]:
                trainings.append((Task(cell, "train"), None, ""))
            elif self.parts[cell]["train"]["status"] != "ok":
                self._follow(cell)
            else:
                assert folder is not None
                params = load_checkpoint(folder / CHECKPOINT)["params"]
                evaluations += self._follow(cell, params, uuid.uuid4().hex)
        return trainings + evaluations

    def done(self, task: Task, part: Part, params: Params | None) -> list[Job]:
        """Keep ``task``'s part; returns the jobs that follow it."""
        part = json.loads(json.dumps(plots.json_safe(part)))  # as read back from its file
        self.parts[task.cell][task.name] = part
        if self.out is not None:
            plots.write_json(self.out / task.cell.folder / f"task-{task.name}.json", part)
        if task.kind == "ll" and self.say is not None:
            self._progress(task.cell)
        elif task.kind == "train" and self.say is not None and part["status"] == "ok":
            self.say(f"[{_tag(task.cell)}] trained in {part['train_seconds']:.0f} s")
        return self._follow(task.cell, params, part.get("token", ""))

    def _follow(self, cell: Cell, params: Params | None = None, token: str = "") -> list[Job]:
        """The evaluation jobs of a cell just trained (``params`` given); or when every part
        of ``cell`` is in, its result."""
        parts = self.parts[cell]
        tasks = evaluation_tasks(cell, num_items(self.ds.test))
        left = [task for task in tasks if task.name not in parts]
        if left and parts["train"]["status"] == "ok":
            return [(task, params, token) for task in left] if params is not None else []
        result, per_point = _cell_result(self.config, cell, parts, [Task(cell, "train"), *tasks])
        exact = data.exact_log_likelihood(self.ds)
        result.exact_log_likelihood = float(exact.double().mean()) if exact is not None else None
        if self.out is not None:
            timings = {name: {k: part[k] for k in ("seconds", "cpu_seconds") if k in part}
                       for name, part in parts.items()}  # fmt: skip
            document = {"result": result.to_json(), "ll": per_point, "tasks": timings}
            plots.write_json(self.out / cell.folder / CELL, document)
            for name in parts:
                (self.out / cell.folder / f"task-{name}.json").unlink(missing_ok=True)
        self.finish(cell, result, per_point)
        return []

    def _progress(self, cell: Cell) -> None:
        """A line on stderr every 10 s of a cell's log p(x) and after its last chunk."""
        chunks = [part for name, part in self.parts[cell].items() if name.startswith("ll-")]
        points, total = sum(len(part["ll"]) for part in chunks), num_items(self.ds.test)
        now = time.perf_counter()
        if points == total or now - self.said.get(cell, 0.0) >= 10.0:
            seconds = sum(part["seconds"] for part in chunks)
            assert self.say is not None
            self.say(f"[{_tag(cell)}] log p(x), K={self.config.ll_samples}: {points}/{total} "
                     f"points ({seconds:.0f} s)")  # fmt: skip
            self.said[cell] = now


# -- Executors -----------------------------------------------------------------------------


def _worker(
    config: dict[str, Any],
    task: Task,
    params: Params | None,
    token: str,
    out: str | None,
    threads: int,
) -> tuple[Part, Params | None]:
    """:func:`run_task` in a worker process or Ray task (``threads`` torch threads), on the
    data of ``config`` (loaded once per process)."""
    torch.set_num_threads(threads)
    run = runs.RunConfig.from_json(config)
    return run_task(run, task, _data(run), Path(out) if out is not None else None, (params, token))


def _drive(first: Sequence[Job], submit: Callable[[Job], Future[Any]], done: Done) -> None:
    """Submit ``first`` and, as each task finishes, the jobs that ``done`` says follow it."""
    pending = {submit(job): job[0] for job in first}
    while pending:
        ready, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in ready:
            for job in done(pending.pop(future), *future.result()):
                pending[submit(job)] = job[0]


@contextlib.contextmanager
def workers(config: runs.RunConfig, plan: Plan) -> Iterator[ProcessPoolExecutor | None]:
    """The local worker processes of ``plan`` (None when its tasks run in this process or on
    Ray), started on entering, so that their imports and data loading overlap what the
    caller does next (:func:`check`), and shut down on leaving.

    Spawned, each with its share of torch's threads; Ctrl-C ends a worker at once (the
    signal's default action: no traceback per worker) and this process reports it.
    """
    if plan.executor != "local" or plan.jobs < 2 or len(plan.cells()) < 2:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        plan.jobs, context, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_DFL)
    )
    for _ in range(plan.jobs):
        pool.submit(_warm, config.to_json(), max(1, torch.get_num_threads() // plan.jobs))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(cancel_futures=True)


def _warm(config: dict[str, Any], threads: int) -> None:
    """A worker's start: torch's threads and the data loaded (once per process)."""
    torch.set_num_threads(threads)
    _data(runs.RunConfig.from_json(config))


def _run_local(
    config: runs.RunConfig,
    first: Sequence[Job],
    pool: ProcessPoolExecutor,
    jobs: int,
    out: Path | None,
    done: Done,
) -> None:
    """The tasks in ``pool``'s ``jobs`` processes (:func:`workers`)."""
    threads = max(1, torch.get_num_threads() // jobs)
    values, folder = config.to_json(), str(out) if out is not None else None
    _drive(first, lambda job: pool.submit(_worker, values, *job, folder, threads), done)


def _run_ray(config: runs.RunConfig, first: Sequence[Job], out: Path | None, done: Done) -> None:
    """The tasks as Ray tasks: on the cluster of ``RAY_ADDRESS`` when set (``ray.init(
    address="auto")``), else on a local Ray instance (one CPU, one torch thread per task);
    a cell's trained parameters go once into Ray's object store."""
    try:
        import ray
    except ImportError as error:
        raise ImportError('the ray executor needs Ray: pip install "pyro-vae[ray]"') from error
    if not ray.is_initialized():
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None)
    remote = ray.remote(num_cpus=1)(_worker)
    values, folder = config.to_json(), str(out) if out is not None else None
    stored: dict[str, Any] = {}

    def submit(job: Job) -> Future[Any]:
        task, params, token = job
        if params is not None and token not in stored:
            stored[token] = ray.put(params)
        shared = stored.get(token) if params is not None else None
        return remote.remote(values, task, shared, token, folder, 1).future()

    _drive(first, submit, done)


def _run_here(
    config: runs.RunConfig,
    first: Sequence[Job],
    ledger: _Ledger,
    say: ProgressFn | None,
    open_loggers: Callable[[Cell], Sequence[Any]],
    logged: dict[Cell, Sequence[Any]],
) -> None:
    """The tasks in this process, a cell's evaluation right after its training."""
    queue, ds = list(first), ledger.ds.to(config.device)
    while queue:
        task, params, token = queue.pop(0)
        if task.kind == "train":
            logged[task.cell] = open_loggers(task.cell)
        part, trained = run_task(
            config, task, ds, ledger.out, (params, token), say, logged.get(task.cell, ())
        )
        queue[:0] = ledger.done(task, part, trained)


# -- The comparison ------------------------------------------------------------------------


def check(config: runs.RunConfig, plan: Plan, ds: data.Splits) -> None:
    """Refuse, before anything is trained or written, data outside the likelihood's support,
    a model that cannot read the data and a bound whose engine does not apply to the model
    (``pvae.fit``'s checks, :func:`pvae.check_fit`, with every bound's engine).

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
    model = config.build_model(ds)
    check_support(model, ds)
    for spec in plan.bounds:
        engine = spec.build(config.particles)
        try:
            pvae.check_fit(model.model, model.guide, ds.train, engine, config.batch_size, ds.valid)
        except TypeError as error:
            raise TypeError(f"bound {spec.label!r}: {error}") from error
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"bound {spec.label!r}: {error}") from error


def compare(
    config: runs.RunConfig,
    plan: Plan | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    loggers: Callable[[str, Mapping[str, Any]], Sequence[Any]] | None = None,
    ds: data.Splits | None = None,
    pool: ProcessPoolExecutor | None = None,
    checked: bool = False,
) -> list[BoundResult]:
    """Train ``config``'s model once per cell of ``plan`` (default: :meth:`Plan.of`
    ``config``) with the same data and budget, measure each, and (with ``run_dir``) write
    the report built from the cells' folders.

    A cell whose folder already holds its ``cell.json`` is not run again, nor a task whose
    part is there (an interrupted comparison continues with the tasks left: a cell with a
    checkpoint resumes its training from it, a trained cell its evaluation). The tasks are
    independent given their cell's training: run in ``plan.jobs`` processes or as Ray tasks
    they give the same numbers, bit for bit, as one after the other (with equal torch
    threads per task).

    :param config: the run (``command="compare"``, e.g. from :func:`run_config`); its
        ``bounds``, ``seeds``, ``yardstick``, ``snr_repeats``, ``device`` are the comparison's.
    :param progress: one line per epoch (cells trained in this process), per 10 s of a
        cell's log p(x) (stderr) and per cell.
    :param argv: the command line recorded in ``results.md``.
    :param loggers: experiment tracking, ``loggers(label, params)`` the loggers of one cell:
        they see its steps and epochs when the cells run in this process, its numbers always.
    :param ds: the data as ``config.load_data()`` gives them (loaded here when None; cells
        run in other processes load their own from ``config``).
    :param pool: ``plan``'s worker processes from :func:`workers` (started here when None).
    :param checked: the caller has run :func:`check` on ``config``, ``plan`` and ``ds`` (the
        CLI does, to word its refusals), so it is not run again.
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
    with contextlib.ExitStack() as stack:
        pool = pool if pool is not None else stack.enter_context(workers(config, plan))
        ds = ds if ds is not None else config.load_data()
        if not checked:
            check(config, plan, ds)
        out = Path(run_dir) if run_dir is not None else None
        argv = list(argv) if argv is not None else _command(config)
        if out is not None:
            runs.write_config(out, config, ds, argv=argv)
        found = {cell: read_cell(out / cell.folder) for cell in plan.cells()} if out else {}
        finished = {cell: pair for cell, pair in found.items() if pair is not None}
        todo = [cell for cell in plan.cells() if cell not in finished]
        _run_cells(config, plan, todo, ds, out, progress, loggers, finished, pool)
    results = [finished[cell][0] for cell in plan.cells()]
    add_deltas(results, {(c.bound, c.seed): finished[c][1] for c in plan.cells()})
    if out is not None:
        elapsed, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        rows = [result.to_json() for result in results]
        report.write(out, rows, _report_config(config, ds), argv, elapsed, cpu_seconds)
    return results


def _run_cells(
    config: runs.RunConfig,
    plan: Plan,
    cells: Sequence[Cell],
    ds: data.Splits,
    out: Path | None,
    progress: bool,
    loggers: Callable[[str, Mapping[str, Any]], Sequence[Any]] | None,
    finished: dict[Cell, tuple[BoundResult, list[float]]],
    pool: ProcessPoolExecutor | None,
) -> None:
    """Run the tasks left of ``cells`` by ``plan``'s executor (local: in ``pool``'s processes)
    into ``finished``, sending each cell's numbers to its loggers and (``progress``) printing
    its summary line."""
    logged: dict[Cell, Sequence[Any]] = {}  # the loggers of the cells trained here

    def open_loggers(cell: Cell) -> Sequence[Any]:
        name = f"{cell.bound}/seed-{cell.seed}" if plan.several else cell.bound
        params = {**config.to_json(), "seed": cell.seed, "bound": cell.bound}
        return loggers(name, params) if loggers else []

    def finish(cell: Cell, result: BoundResult, ll: list[float]) -> None:
        finished[cell] = (result, ll)
        for logger in logged.pop(cell) if cell in logged else open_loggers(cell):
            logger.log_metrics({k: v for k, v in result.to_json().items() if k in report.NUMBERS})
            logger.close(failed=not result.ok)
        if progress:
            tqdm.write(report.summary_line(result.to_json(), config.ll_samples, plan.several))

    say: ProgressFn | None = (lambda line: tqdm.write(line, file=sys.stderr)) if progress else None
    _LOADED.clear()  # a model rebuilt by an earlier comparison in this process
    ledger = _Ledger(config, ds, out, finish, say)
    first = ledger.start(cells)
    if plan.executor == "ray":
        _run_ray(config, first, out, ledger.done)
    elif pool is not None and len(first) > 1:
        _run_local(config, first, pool, plan.jobs, out, ledger.done)
    else:
        epochs = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else None
        _run_here(config, first, ledger, epochs, open_loggers, logged)
    _LOADED.clear()


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

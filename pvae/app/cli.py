"""The ``pvae`` command line.

::

    pvae datasets
    pvae train --dataset digits --engine elbo --epochs 10 --run-dir runs/digits-elbo
    pvae compare                       # ELBO, IWAE, MIWAE, CIWAE, PIWAE on MNIST-5k
    pvae compare --quick --dataset digits --bounds elbo,iwae-dreg,miwae:4x16
    pvae diagnose runs/digits-elbo     # collapse, relevance and traversals of a trained run
    pvae sample --dataset mnist5k --model bae --max-train 500 --run-dir runs/bae
    pvae diagnose runs/bae             # R-hat, ESS, ArviZ summary and traces of a sampler run

``pvae compare`` trains the same model once per bound (same seed, data and particle budget)
and writes a table of test log-likelihood, ELBO, IWAE-64, inference gap, active units,
gradient SNR and seconds per epoch into its run folder (``results.md``, ``results.json``,
``results.csv`` and plots); see :mod:`pvae.app.compare`.

Every model of :data:`pvae.app.registry.MODELS` (vae, cvae, hvae, multimodal, ard, ...) is
reachable from ``train``, ``compare`` and ``diagnose``; its own options are added to the
parsers from its registration as ``--<model>-<option>`` (e.g. ``--hvae-layers 3``,
``--multimodal-fusion mopoe``, ``--cvae-given 2``). Engines are looked up in
:data:`pvae.app.registry.ENGINES`; those that need particles (iwae, ciwae, miwae, piwae) train
with 64 when ``--particles`` is not given, and refuse fewer than they need.

``pvae train`` looks the model and the engine up in :mod:`pvae.app.registry` and the dataset in
:mod:`pvae.data`, checks the likelihood's support on the data, trains with :func:`pvae.fit`,
estimates the test log-likelihood with :func:`pvae.log_likelihood`, and writes into the run
folder (every file atomically: a temporary name in the same folder, then a rename):

- ``config.json``: the run's :class:`pvae.app.runs.RunConfig` (``run``), every argument
  (defaults resolved), the canonical command line that reproduces the run (``argv``), the
  pvae/torch/pyro versions and facts about the data;
- ``checkpoint.pt`` and ``run.json``: written by :func:`pvae.fit` after every epoch;
- ``metrics.json`` and ``metrics.csv``: the per-epoch history and the final test
  log-likelihood (mean and standard error over test points);
- ``learning_curve.png``, ``reconstructions.png``, ``samples.png``.

``pvae diagnose RUN_DIR`` rebuilds the data and the model of a ``pvae train`` or
``pvae compare`` run folder from its :class:`~pvae.app.runs.RunConfig`, loads the checkpoint
and writes
``diagnostics.md``, ``kl_per_dim.png``, ``activity.png``, ``relevance.png`` and
``traversals.png`` (for a compare run: one subfolder per bound and a summary on top); see
:mod:`pvae.app.diagnose`.

Errors in the invocation (unknown names, bad numbers, missing data files, data outside the
likelihood's support, a run folder that does not match ``--resume``) print one line
``pvae: error: ...`` and exit with status 2; a run that fails while training exits with 1.
Set ``PVAE_DEBUG=1`` to get the traceback instead.

The arguments are parsed by :mod:`pvae.app.arguments` (without importing torch), which then
runs a command of this module. Adding a subcommand: write ``_add_<name>_arguments(parser)``
there, ``_<name>(args) -> int`` here (reuse :func:`_load`, :func:`_build`,
:func:`_train_and_evaluate`, :func:`_write_outputs`), then add a ``Command`` to
``pvae.app.arguments.COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import atomic, data, plots, tracking
from pvae.app import compare, diagnose, runs
from pvae.app import sample as sample_app
from pvae.app.arguments import (  # the parser (no torch): `pvae` parses there, runs here
    COMMANDS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    SAMPLE_CHAINS,
    SAMPLE_CHECKPOINT_EVERY,
    CliError,
    _model_options,
    _subparsers,
    build_parser,
    main,
)
from pvae.app.registry import MODELS, ModelCard, parse_bound
from pvae.checkpoint import RUN_JSON, RunDirInUse, load_checkpoint
from pvae.evaluate import as_tensors
from pvae.inference import SGHMC
from pvae.train import CHECKPOINT, Run, TrainingDiverged

__all__ = [  # the parser's names too, as this module has always offered them
    "COMMANDS",
    "EXIT_USAGE",
    "SAMPLE_CHAINS",
    "SAMPLE_CHECKPOINT_EVERY",
    "CliError",
    "build_parser",
    "canonical_argv",
    "main",
]


def _open_loggers(args: argparse.Namespace, run_dir: Path, **options: Any) -> Any:
    """The loggers of ``--log`` (a context manager); a missing package is a usage error."""
    with _refused("--log: ", (ImportError,)):
        return tracking.open_loggers(args.log, run_dir, params=_json_args(args), **options)


# ---------------------------------------------------------------------------------------------
# Building blocks of a command
# ---------------------------------------------------------------------------------------------


def _config(command: str, args: argparse.Namespace) -> runs.RunConfig:
    """The command line as a :class:`~pvae.app.runs.RunConfig` (once, arguments resolved)."""
    return runs.RunConfig.from_args(command, args, _model_options(args))


def _load(config: runs.RunConfig, args: argparse.Namespace) -> data.Splits:
    """``config.load_data()``; failures become :class:`CliError`; ``args.likelihood`` is
    resolved to the dataset's default when it was None."""
    try:
        ds = config.load_data()
    except runs.ModelDataError as error:
        raise CliError(str(error)) from error
    except (ValueError, TypeError, OSError, ImportError) as error:
        if isinstance(error, TypeError) and "unexpected keyword" not in str(error):
            raise
        raise CliError(f"dataset {config.dataset!r}: {error}") from error
    args.likelihood = config.likelihood
    return ds


@contextlib.contextmanager
def _refused(
    prefix: str = "", errors: tuple[type[Exception], ...] = (ValueError,)
) -> Iterator[None]:
    """A refusal (one of ``errors``) inside becomes :class:`CliError` ``prefix + message``."""
    try:
        yield
    except errors as error:
        raise CliError(f"{prefix}{error}") from error


def _build(config: runs.RunConfig, ds: data.Splits) -> PyroModule:
    """``config.build_model(ds)``, its data checked against the likelihood's support."""
    with _refused(f"model {config.model!r}: "):
        model = config.build_model(ds)
    with _refused():
        compare.check_support(model, ds)
    return model


def _folder(run_dir: str | Path) -> runs.RunFolder:
    """The checked :class:`~pvae.app.runs.RunFolder` of ``--run-dir``."""
    with _refused(errors=(runs.RunFolderError,)):
        return runs.RunFolder(run_dir)


@contextlib.contextmanager
def _locked(folder: runs.RunFolder) -> Iterator[Path]:
    """``with folder``, its lock and creation failures as :class:`CliError`."""
    try:
        with folder:
            yield folder.path
    except RunDirInUse as error:
        raise CliError(f"--run-dir: {error}") from error
    except OSError as error:  # creating or locking the folder
        raise CliError(f"cannot write to --run-dir {folder.path}: {error}") from error


def _check_pair(
    args: argparse.Namespace, model: PyroModule, engine: pyro.infer.ELBO, ds: data.Splits
) -> None:
    """``pvae.fit``'s checks of the model, the engine and the data against one another (a model
    that cannot read the dataset's batches, an engine that does not apply to the model), run
    before anything is written into the run folder."""
    try:
        pvae.check_fit(model.model, model.guide, ds.train, engine, args.batch_size, valid=ds.valid)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise CliError(
            f"--model {args.model} with --engine {args.engine} on --dataset {args.dataset}: {error}"
        ) from error


@dataclass
class TrainResult:
    """What :func:`_train_and_evaluate` returns."""

    model: PyroModule
    run: Run
    test_log_likelihood: torch.Tensor  # (N_test,) nats
    extra: dict[str, Any] = field(default_factory=dict)  # the model's own test metrics

    @property
    def test_mean(self) -> float:
        return float(self.test_log_likelihood.mean())

    @property
    def test_stderr(self) -> float:
        n = self.test_log_likelihood.numel()
        return float(self.test_log_likelihood.std() / math.sqrt(n)) if n > 1 else math.nan


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _train_and_evaluate(
    args: argparse.Namespace,
    ds: data.Splits,
    model: PyroModule,
    engine: pyro.infer.ELBO,
    run_dir: Path,
    resume: bool,
    loggers: Sequence[tracking.Logger] = (),
) -> TrainResult:
    """``pvae.fit`` into ``run_dir``, then the test log-likelihood (seeded, K=ll_samples);
    ``loggers`` (``--log``) see every step and epoch."""

    def report(run: Run, record: dict[str, Any]) -> None:
        if args.quiet:
            return
        valid = record.get("valid_bound")
        valid_text = f", valid bound {valid:.3f}" if valid is not None else ""
        tqdm.write(
            f"epoch {record['epoch'] + 1}/{args.epochs}: train bound "
            f"{record['train_bound']:.3f}{valid_text} nats ({record['seconds']:.1f} s)",
            file=sys.stdout,
        )

    entry = MODELS[args.model]
    extra = entry.callbacks(model, ds) if entry.callbacks is not None else []
    try:
        run = pvae.fit(
            model.model,
            model.guide,
            ds.train,
            engine=engine,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            valid=ds.valid,
            seed=args.seed,
            run_dir=run_dir,
            resume=resume,
            progress=not args.quiet,
            callbacks=[*extra, report, *(logger.epoch for logger in loggers)],
            step_callbacks=[logger.step for logger in loggers],
        )
    except TrainingDiverged as error:
        raise CliError(f"training diverged: {error}", EXIT_FAILURE) from error
    except ValueError as error:
        raise CliError(f"training failed: {error}", EXIT_FAILURE) from error
    model.eval()  # e.g. no self-supervised masking while measuring
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        log_likelihood = compare.log_likelihood(
            model,
            ds.test,
            args.ll_samples,
            batch_size=args.batch_size,
            chunk_size=max(1, 10_000 // args.batch_size),
            progress=not args.quiet,
        )
        torch.manual_seed(args.seed)
        own = entry.metrics(model, ds, "test", args.seed) if entry.metrics is not None else {}
    return TrainResult(model, run, log_likelihood, own)


# ---------------------------------------------------------------------------------------------
# Atomic output files
# ---------------------------------------------------------------------------------------------


_write_atomic = atomic.write_text  # text or bytes; a temporary file, then a rename
_write_json = runs.write_json  # NaN and infinities become null


_HISTORY_COLUMNS = ["epoch", "train_bound", "valid_bound", "seconds", "steps"]


def _metrics(result: TrainResult, num_samples: int) -> dict[str, Any]:
    history = [{key: record.get(key) for key in _HISTORY_COLUMNS} for record in result.run.history]
    last = history[-1] if history else {}
    return {
        "history": history,
        "final": {
            "epochs": len(history),
            "train_bound": last.get("train_bound"),
            "valid_bound": last.get("valid_bound"),
        },
        "test_log_likelihood": {
            "mean": result.test_mean,
            "stderr": result.test_stderr,
            "num_samples": num_samples,
            "num_datapoints": int(result.test_log_likelihood.numel()),
            "units": "nats per datapoint",
        },
        "train_seconds": sum(float(record.get("seconds") or 0.0) for record in history),
        "test_metrics": dict(result.extra),  # the model's registration's metrics
    }


def _metrics_csv(metrics: dict[str, Any]) -> str:
    """One row per epoch; the test log-likelihood columns are filled on the last row."""
    columns = [*_HISTORY_COLUMNS, "test_log_likelihood", "test_log_likelihood_stderr"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    history = metrics["history"]
    for index, record in enumerate(history):
        row = {key: ("" if value is None else value) for key, value in record.items()}
        if index == len(history) - 1:
            row["test_log_likelihood"] = metrics["test_log_likelihood"]["mean"]
            row["test_log_likelihood_stderr"] = metrics["test_log_likelihood"]["stderr"]
        writer.writerow(row)
    return buffer.getvalue()


def _write_outputs(
    run_dir: Path, result: TrainResult, ds: data.Splits, args: argparse.Namespace
) -> dict[str, Any]:
    """``metrics.json``, ``metrics.csv`` and the three plots; returns the metrics."""
    metrics = _metrics(result, args.ll_samples)
    _write_json(run_dir / "metrics.json", metrics)
    _write_atomic(run_dir / "metrics.csv", _metrics_csv(metrics))
    plots.learning_curve(
        result.run.history, path=run_dir / "learning_curve.png", title=_title(args)
    )
    _figures(result.model, MODELS[args.model], ds, args.seed, run_dir)
    return metrics


def _figures(model: PyroModule, card: ModelCard, ds: data.Splits, seed: int, run_dir: Path) -> None:
    """``reconstructions.png`` and ``samples.png`` where the model has ``reconstruct`` and
    draws data unconditionally (``sample(num_samples)``: a card with the ``sample``
    capability, neither over sequences, whose ``sample`` draws paths, nor a conditional task
    with its own view of the data). A model over several tensors shows the first modality (its
    outputs a dict) or the last argument (a conditional model's y)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = tuple(t[: min(10, t.shape[0])] for t in as_tensors(ds.test))
        if hasattr(model, "reconstruct"):
            shown = model.reconstruct(*batch)
            target = batch[-1]
            if isinstance(shown, dict):
                shown, target = next(iter(shown.values())), batch[0]
            shape = ds.image_shape if target.shape[1] == ds.x_dim else None
            plots.reconstructions(target, shown, shape, path=run_dir / "reconstructions.png")
        sequences = {"sequences", "multimodal-sequences"} & set(card.accepts)
        if "sample" in card.capabilities and card.prepare is None and not sequences:
            count = 64 if ds.image_shape is not None else 500
            drawn = model.sample(count)
            if isinstance(drawn, dict):
                drawn = next(iter(drawn.values()))
            test = as_tensors(ds.test)[0]
            plots.samples(
                drawn,
                ds.image_shape,
                path=run_dir / "samples.png",
                data=test if ds.image_shape is None else None,
            )


def _title(args: argparse.Namespace) -> str:
    return f"{args.model} / {args.engine} on {args.dataset}"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON values (tuples become lists), without the dispatch entry."""
    values = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    return json.loads(json.dumps(values))


def canonical_argv(command: str, args: argparse.Namespace) -> list[str]:
    """A command line that parses back to ``args`` (every option spelled out)."""
    parser = build_parser()
    subparser = _subparsers(parser)[command]
    argv = [command]
    for action in subparser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(flag)
        elif value is not None:
            if isinstance(value, list | tuple):
                value = ",".join(str(item) for item in value)
            argv += [flag, str(value)]
    return argv


# Arguments that may change between a run and its --resume.
_RESUMABLE = {"epochs", "resume", "overwrite", "quiet", "ll_samples", "run_dir", "data_path"}
_RESUMABLE.add("log")  # experiment tracking may change between a run and its --resume


def _check_resume(run_dir: Path, args: argparse.Namespace) -> None:
    """With --resume, the arguments that define the run must match its config.json."""
    path = run_dir / "config.json"
    if not (run_dir / CHECKPOINT).is_file():
        raise CliError(
            f"--resume: {run_dir} holds no {CHECKPOINT} to continue; drop --resume to start a "
            "new run"
        )
    if not path.is_file():
        raise CliError(
            f"--resume: {path} is missing, so the settings of the run in {run_dir} are unknown; "
            "start a new run in another --run-dir (or --overwrite this one)"
        )
    try:
        done = int(load_checkpoint(run_dir / CHECKPOINT)["epoch"]) + 1
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"--resume: cannot read {run_dir / CHECKPOINT}: {error}") from error
    if args.epochs < done:
        raise CliError(
            f"--resume: the run in {run_dir} has done {done} epochs; --epochs {args.epochs} is "
            f"fewer (pass --epochs >= {done})"
        )
    try:
        previous = json.loads(path.read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"cannot read {path} to resume the run: {error}") from error
    _refuse_changed_arguments(run_dir, previous, _json_args(args), _RESUMABLE)


def _refuse_changed_arguments(
    run_dir: Path, previous: dict[str, Any], current: dict[str, Any], resumable: Any
) -> None:
    """Refuse a ``--resume`` whose arguments (other than ``resumable`` ones) differ from those
    recorded in the run's ``config.json``, naming each."""
    changed = [
        f"--{key.replace('_', '-')} (was {previous.get(key)!r}, now {current.get(key)!r})"
        for key in sorted(set(previous) | set(current))
        if key not in resumable and previous.get(key) != current.get(key)
    ]
    if changed:
        raise CliError(
            f"--resume continues the run in {run_dir}, but these arguments differ from its "
            f"config.json: {'; '.join(changed)}; use another --run-dir to start a new run"
        )


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    folder = _folder(args.run_dir)
    if _folder_command(folder.path) == "sample":
        raise CliError(
            f"--run-dir {folder.path} holds a 'pvae sample' run (a posterior over weights, not "
            "a trained model); 'pvae train' neither continues nor overwrites it: "
            + ("continue it with 'pvae sample --resume', or " if args.resume else "")
            + "choose another --run-dir"
        )
    if not args.resume:
        with _refused(errors=(runs.RunFolderError,)):
            folder.refuse_run(args.resume, args.overwrite)
    if args.particles is None:
        args.particles = parse_bound(args.engine).default_particles()
    config = _config("train", args)
    ds = _load(config, args)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    _check_memory(args, ds)
    with _refused(f"model {config.model!r}: "):
        model = config.build_model(ds)
    with _refused(f"engine {config.engine!r}: "):
        engine = config.build_engine()
    with _refused():
        compare.check_support(model, ds)
    if args.resume:
        _check_resume(folder.path, args)
    _check_pair(args, model, engine, ds)  # everything is checked before the folder is touched
    with _locked(folder) as run_dir, _open_loggers(args, run_dir, fresh=args.overwrite) as logs:
        return _train_locked(args, config, ds, (model, engine), run_dir, logs)


# What ``pvae train`` and ``pvae diagnose`` write into a run folder: --overwrite removes these
# (and nothing else: the folder may hold the user's own files).
_RUN_OUTPUTS = (
    CHECKPOINT,
    RUN_JSON,
    runs.CONFIG,
    "metrics.json",
    "metrics.csv",
    "learning_curve.png",
    "reconstructions.png",
    "samples.png",
    diagnose.RESULTS,
    diagnose.REPORT,
    *diagnose.FIGURES,
)


def _check_memory(args: argparse.Namespace, ds: data.Splits, limit: float = 0.5) -> None:
    """Refuse, before building it, an MLP model whose parameters (weights, gradients and
    Adam's two moments: four float32 copies) would take more than ``limit`` of the machine's
    memory. The estimate counts an encoder ``x -> hidden -> 2 z`` and a decoder
    ``z -> hidden -> x``."""
    x_dim = int(getattr(ds, "x_dim", 0) or 0)
    widths = [int(h) for h in (args.hidden or ())]
    if not x_dim or args.z_dim is None:
        return
    encoder = [x_dim, *widths, 2 * int(args.z_dim)]
    decoder = [int(args.z_dim), *widths[::-1], x_dim]
    count = sum(
        (a + 1) * b
        for layers in (encoder, decoder)
        for a, b in zip(layers[:-1], layers[1:], strict=True)
    )
    total = count * 4 * 4
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if total > limit * available:
        raise CliError(
            f"the model needs about {total / 2**30:.1f} GiB for training (weights, gradients "
            f"and Adam's moments), more than half of this machine's {available / 2**30:.1f} "
            "GiB; reduce --z-dim or --hidden"
        )


def _train_locked(
    args: argparse.Namespace,
    config: runs.RunConfig,
    ds: data.Splits,
    pair: tuple[PyroModule, pyro.infer.ELBO],
    run_dir: Path,
    loggers: Sequence[tracking.Logger] = (),
) -> int:
    """``pvae train`` once ``run_dir`` is locked: clear it (--overwrite), write config.json,
    train ``pair`` (model, engine), write the outputs (and log them to ``loggers``)."""
    model, engine = pair
    if args.overwrite:
        for name in _RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
    try:
        runs.write_config(
            run_dir,
            config,
            ds,
            args=_json_args(args),
            argv=canonical_argv(args.command, args),
        )
    except OSError as error:
        raise CliError(f"cannot write to --run-dir {run_dir}: {error}") from error
    try:
        result = _train_and_evaluate(
            args, ds, model, engine, run_dir, resume=args.resume, loggers=loggers
        )
    except KeyboardInterrupt:
        if (run_dir / CHECKPOINT).is_file():
            what = f"the checkpoint of the last full epoch is in {run_dir}: continue with --resume"
        else:
            what = f"no checkpoint was written in {run_dir} (interrupted in the first epoch)"
        print(f"{PROG}: interrupted; {what}", file=sys.stderr)
        return 130
    try:
        metrics = _write_outputs(run_dir, result, ds, args)
    except OSError as error:
        raise CliError(f"cannot write the outputs into {run_dir}: {error}", EXIT_FAILURE) from error
    tracking.log_outputs(loggers, run_dir, {"test_log_likelihood": metrics["test_log_likelihood"]})
    test = metrics["test_log_likelihood"]
    print(
        f"test log-likelihood {test['mean']:.3f} +- {test['stderr']:.3f} nats "
        f"(K={test['num_samples']}, {test['num_datapoints']} test points)"
        + "".join(f", {name} {value:.4g}" for name, value in metrics["test_metrics"].items())
        + f"; outputs in {run_dir}"
    )
    return EXIT_OK


def _threads() -> str:
    threads = torch.get_num_threads()
    return f"{threads} thread{'s' if threads != 1 else ''}"


def _compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vars(args).update(
        compare.settings(args.quick, **{key: getattr(args, key) for key in compare.DEFAULTS})
    )
    try:
        compare.resolve_device(args.device)
    except ValueError as error:
        raise CliError(f"--device: {error}") from error
    if args.seeds is not None:
        args.seed = args.seeds[0]  # the data are loaded (split, subset) with the first seed
    try:
        specs = compare.resolve_bounds(args.bounds, args.particles, args.inner)
    except ValueError as error:
        raise CliError(f"--bounds: {error}") from error
    args.bounds = [spec.label for spec in specs]
    args.run_dir = args.run_dir if args.run_dir is not None else f"runs/compare-{args.dataset}"
    folder = _folder(args.run_dir)
    _refuse_earlier_comparison(folder.path, args)
    config = _config("compare", args)
    config.yardstick = None if args.yardstick == "none" else args.yardstick
    ds = _load(config, args)
    if args.resume:
        _check_compare_resume(folder.path, config)
    pyro.clear_param_store()
    model = _build(config, ds)
    try:  # every bound's engine on the model, before the folder is touched
        compare.check_pairs(model, ds, specs, args.particles, args.batch_size)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise CliError(f"--model {args.model} on --dataset {args.dataset}: {error}") from error
    plan = compare.Plan(specs, list(config.seeds), args.jobs, args.executor)
    with _locked(folder) as run_dir:
        return _compare_locked(args, (config, ds), plan, run_dir, started)


def _refuse_earlier_comparison(run_dir: Path, args: argparse.Namespace) -> None:
    """An earlier comparison in ``run_dir`` is refused unless --overwrite (replaced) or
    --resume (continued: its config.json must hold these arguments)."""
    earlier = _compare_outputs(run_dir)
    if args.resume and not (run_dir / runs.CONFIG).is_file():
        raise CliError(f"--resume: {run_dir} holds no comparison ({runs.CONFIG}) to continue")
    if earlier and not (args.overwrite or args.resume):
        raise CliError(
            f"{run_dir} already holds a comparison ({', '.join(p.name for p in earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}); use another --run-dir, --resume to "
            "continue it, or --overwrite to replace it"
        )


def _check_compare_resume(run_dir: Path, config: runs.RunConfig) -> None:
    """With --resume, the comparison recorded in ``run_dir`` must be ``config`` (the data
    path may change)."""
    try:
        previous = runs.read_config(run_dir)[0].to_json()
    except runs.RunFolderError as error:
        raise CliError(f"--resume: {error}") from error
    _refuse_changed_arguments(run_dir, previous, config.to_json(), {"data_path"})


def _compare_outputs(run_dir: Path) -> list[Path]:
    """What an earlier ``pvae compare`` (and ``pvae diagnose`` on it) left in ``run_dir``: its
    files, and the per-bound run folders (those holding a checkpoint or run.json); nothing
    else (the folder may hold the user's own files)."""
    if not run_dir.is_dir():
        return []
    names = dict.fromkeys((*compare.OUTPUTS, runs.CONFIG, *diagnose.FILES, diagnose.RESULTS))
    found = [run_dir / name for name in names if (run_dir / name).is_file()]

    def holds_run(folder: Path) -> bool:
        return (folder / CHECKPOINT).is_file() or (folder / RUN_JSON).is_file()

    found += sorted(
        child
        for child in run_dir.iterdir()
        if child.is_dir()
        and (holds_run(child) or any(holds_run(seed) for seed in child.glob("seed-*")))
    )
    return found


def _compare_locked(
    args: argparse.Namespace,
    run: tuple[runs.RunConfig, data.Splits],
    plan: compare.Plan,
    run_dir: Path,
    started: float,
) -> int:
    """``pvae compare`` of ``run`` (the config and its data) once ``run_dir`` is locked:
    clear an earlier comparison (--overwrite), compare, report."""
    config, ds = run
    unit = "sequence" if isinstance(ds, data.SequenceSplits) else None
    if args.overwrite:
        for path in _compare_outputs(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    loggers, results = _open_loggers(args, run_dir, run_name="compare"), None
    try:
        results = compare.compare(
            config,
            plan,
            run_dir=run_dir,
            progress=not args.quiet,
            argv=[PROG, *canonical_argv("compare", args)],
            loggers=tracking.children(loggers) if args.log else None,
            ds=ds,
        )
        tracking.log_outputs(loggers, run_dir)
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; the finished cells (bound folders with {compare.CELL}) are "
            f"kept in {run_dir}: continue with the same command and --resume",
            file=sys.stderr,
        )
        return 130
    except OSError as error:
        raise CliError(f"cannot write the outputs into {run_dir}: {error}", EXIT_FAILURE) from error
    except ValueError as error:
        raise CliError(f"compare failed: {error}", EXIT_FAILURE) from error
    finally:
        loggers.close(failed=results is None)
    rows = [result.to_json() for result in results]
    if plan.several:
        print(compare.format_seed_table(compare.summarize(rows), args.ll_samples, unit))
    else:
        print(compare.format_table(rows, args.ll_samples, unit))
    seeds = f" x {len(plan.seeds)} seeds" if plan.several else ""
    print(
        f"{len(plan.bounds)} bounds{seeds} compared in {time.perf_counter() - started:.0f} s "
        f"({_threads()}, {args.device}); results.md, results.json, results.csv, "
        f"learning_curves.png, log_likelihood.png, snr.png and ll_vs_k.png in {run_dir}"
    )
    failed = [result.run or result.bound for result in results if not result.ok]
    if failed:
        print(f"{PROG}: error: training failed for {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _diagnose(args: argparse.Namespace) -> int:
    say = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        result = diagnose.diagnose(args.run_dir, out_dir=args.out, num_points=args.points, say=say)
    except diagnose.DiagnoseError as error:
        raise CliError(str(error)) from error
    except OSError as error:
        raise CliError(f"cannot write the diagnostics: {error}", EXIT_FAILURE) from error
    if not args.quiet and result.kind in ("train", "sample"):
        print(result.verdict)
    figures = sum(1 for path in result.files if path.suffix == ".png")
    where = f"{len(result.bounds)} bounds, " if result.kind == "compare" else ""
    print(f"{result.report} and {figures} plots written ({where}{_threads()})")
    return EXIT_OK


def _sampler_default(name: str) -> Any:
    """The default of ``SGHMC``'s argument ``name`` (the CLI follows the API's defaults)."""
    return inspect.signature(SGHMC).parameters[name].default


# Arguments of ``pvae sample`` that may change between a run and its --resume.
_SAMPLE_RESUMABLE = {"resume", "quiet", "run_dir", "data_path", "checkpoint_every"}


def _folder_command(run_dir: Path) -> str | None:
    """The command that wrote ``run_dir`` (its config.json's ``command``, else its
    checkpoint's kind), None for a folder without a pvae run."""
    command = runs.recorded_command(run_dir)
    if isinstance(command, str):
        return command
    try:
        kind = json.loads((run_dir / RUN_JSON).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == "sample":
        return "sample"
    return "train" if (run_dir / CHECKPOINT).exists() else None


def _check_sample_folder(run_dir: Path, args: argparse.Namespace) -> runs.RunFolder:
    """The run folder of ``pvae sample``, refused where it cannot be written (or, with
    --resume, continued): checked before the data are loaded."""
    folder = _folder(run_dir)
    command = _folder_command(run_dir)
    if command not in (None, "sample"):
        raise CliError(
            f"--run-dir {run_dir} holds a 'pvae {command}' run, not a 'pvae sample' run; "
            + (
                "continue it with 'pvae train --resume', or "
                if args.resume and command == "train"
                else ""
            )
            + "choose another --run-dir"
        )
    with _refused(errors=(runs.RunFolderError,)):
        folder.refuse_run(args.resume, None)
    return folder


def _check_sample_resume(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """With --resume (arguments resolved), the run's config.json, whose arguments must match
    ``args`` (but those of :data:`_SAMPLE_RESUMABLE`)."""
    try:
        document = json.loads((run_dir / runs.CONFIG).read_text())
        previous = document["args"]
        if not isinstance(document["run"]["model_options"], dict):
            raise TypeError("run.model_options is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(
            f"--resume: cannot read {run_dir / runs.CONFIG}, so the settings of the run in "
            f"{run_dir} are unknown ({error}); start a new run in another --run-dir"
        ) from error
    _refuse_changed_arguments(run_dir, previous, _json_args(args), _SAMPLE_RESUMABLE)
    return dict(document)


def _prior_selection(model: PyroModule) -> dict[str, Any] | None:
    """What a model's data-driven prior choice found (``prior_selection``), as JSON."""
    found = getattr(model, "prior_selection", None)
    if found is None:
        return None
    return {
        "metric": found.metric,
        "chosen": found.best,
        "candidates": list(found.candidates),
        "distances": [round(float(d), 6) for d in found.distances],
    }


def _sample(args: argparse.Namespace) -> int:
    """``pvae sample``: :func:`pvae.app.sample.run_sampler` into ``--run-dir``. Every refusal
    (run folder, model, sampler options, data) comes before anything is written."""
    run_dir = Path(args.run_dir)
    args.lr = _sampler_default("lr") if args.lr is None else args.lr
    args.friction = _sampler_default("friction") if args.friction is None else args.friction
    if args.init_radius is None:
        args.init_radius = _sampler_default("init_radius")
    try:
        sampler = SGHMC(lr=args.lr, friction=args.friction, init_radius=args.init_radius)
    except (ValueError, TypeError) as error:
        raise CliError(f"sampler: {error}") from error
    folder = _check_sample_folder(run_dir, args)
    config, ds, model, selection = _sample_run(args, run_dir)
    settings = {
        "num_samples": args.num_samples,
        "warmup": args.warmup,
        "thin": args.thin,
        "num_chains": args.chains,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "resume": args.resume,
        "checkpoint_every": args.checkpoint_every,
    }
    prior = _describe_prior(config.model_options, selection)
    if not args.quiet:
        print(
            f"{'continuing' if args.resume else 'sampling'} {args.chains} chain(s) of "
            f"--model {args.model} in {run_dir}" + (f", {prior}" if prior else ""),
            flush=True,
        )
    started = time.perf_counter()
    try:
        with _locked(folder):
            if not args.resume:
                runs.write_config(
                    run_dir,
                    config,
                    ds,
                    args=_json_args(args),
                    argv=[PROG, *canonical_argv("sample", args)],
                    extra={"prior_selection": selection} if selection is not None else None,
                )
            posterior = sample_app.run_sampler(
                model, ds, run_dir, settings, _show_progress(args), sampler=sampler
            )
    except pvae.SamplingInterrupted as stop:
        print(
            f"{PROG}: interrupted; checkpoint at chain {stop.chain}, step {stop.step} in "
            f"{run_dir}: continue with the same command and --resume",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        what = (
            f"the last checkpoint in {run_dir} continues with --resume"
            if (run_dir / CHECKPOINT).is_file()
            else f"no checkpoint was written in {run_dir}"
        )
        print(f"{PROG}: interrupted; {what}", file=sys.stderr)
        return 130
    except pvae.SamplingDiverged as error:
        raise CliError(f"sampling diverged: {error} (lower --lr)", EXIT_FAILURE) from error
    except ValueError as error:
        raise CliError(f"sampling failed: {error}", EXIT_FAILURE) from error
    print(
        f"{posterior.num_chains} chain(s) x {posterior.num_samples} draws of "
        f"{len(posterior.samples)} sites in {time.perf_counter() - started:.0f} s"
        + (f" ({prior})" if prior else "")
        + "; "
        f"{sample_app.POSTERIOR}, config.json and figures in {run_dir} "
        f"(pvae diagnose {run_dir}: R-hat, ESS, traces)"
    )
    return EXIT_OK


def _sample_run(
    args: argparse.Namespace, run_dir: Path
) -> tuple[runs.RunConfig, data.Splits, PyroModule, dict[str, Any] | None]:
    """The config, data, model and prior selection of ``pvae sample`` (with --resume, the
    recorded model options and prior selection)."""
    config = _config("sample", args)
    config.engine, config.max_eval = "sghmc", None
    ds = _load(config, args)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    recorded = _check_sample_resume(run_dir, args) if args.resume else None
    if recorded is not None:
        config.model_options = MODELS[args.model].resolve_options(recorded["run"]["model_options"])
    model = _build(config, ds)
    selection = _prior_selection(model)
    if recorded is not None:
        selection = recorded.get("prior_selection")
    if selection is not None:
        config.model_options["prior_scale"] = selection["chosen"]
    return config, ds, model, selection


def _describe_prior(options: dict[str, Any], selection: dict[str, Any] | None) -> str:
    """``prior scale 0.3 (chosen by DSWD among 0.1, 0.3, 1, 3)``; empty for a model without
    a prior scale."""
    if not isinstance(options.get("prior_scale"), int | float):
        return ""
    text = f"prior scale {options['prior_scale']:g}"
    if selection is not None:
        among = ", ".join(f"{c:g}" for c in selection["candidates"])
        text += f" (chosen by {selection['metric'].upper()} among {among})"
    return text


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

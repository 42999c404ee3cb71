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

Adding a subcommand: write ``_add_<name>_arguments(parser)``
(reuse :func:`_add_data_arguments`, :func:`_add_model_arguments`,
:func:`_add_training_arguments`) and ``_<name>(args) -> int`` (reuse :func:`_load_dataset`,
:func:`_build_model`, :func:`_check_support`, :func:`_train_and_evaluate`,
:func:`_write_outputs`), then add a :class:`Command` to :data:`COMMANDS`.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import atomic, data, likelihoods, plots, tracking, validation
from pvae.app import compare, diagnose, runs
from pvae.app import sample as sample_app
from pvae.app.registry import ENGINES, MODELS, Option, Registry, parse_bound
from pvae.app.registry import bound_grammar as _grammar
from pvae.checkpoint import RUN_JSON, RunDirInUse, load_checkpoint
from pvae.evaluate import as_tensors
from pvae.inference import SGHMC, CyclicalAnnealing, LinearAnnealing
from pvae.train import CHECKPOINT, Run, TrainingDiverged

EXIT_OK = 0
EXIT_FAILURE = 1  # the run itself failed (diverged, ...)
EXIT_USAGE = 2  # the invocation cannot work as given (argparse's status)

PROG = "pvae"


class CliError(Exception):
    """An error reported as one line ``pvae: error: <message>`` and exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`CliError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


# ---------------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError with a message argparse shows as it is
# ---------------------------------------------------------------------------------------------


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _non_negative_int(text: str) -> int:
    return _int(text, 0)


def _seed(text: str) -> int:
    value = _int(text, 0)
    if value > validation.MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, {validation.MAX_SEED}] (numpy's limit), got {text!r}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _beta_schedule(text: str) -> str:
    """``linear:STEPS`` or ``cyclical:PERIOD[:RATIO]`` (checked; kept as written)."""
    _schedule(text)
    return text


def _schedule(text: str) -> LinearAnnealing | CyclicalAnnealing:
    """The annealing schedule ``--beta-schedule`` names (:func:`_beta_schedule`)."""
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "linear" and len(parts) == 1 and int(parts[0]) >= 1:
            return LinearAnnealing(int(parts[0]))
        if kind == "cyclical" and len(parts) in (1, 2) and int(parts[0]) >= 1:
            ratio = float(parts[1]) if len(parts) == 2 else 0.5
            if 0.0 <= ratio <= 1.0:
                return CyclicalAnnealing(int(parts[0]), ratio)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected linear:STEPS or cyclical:PERIOD[:RATIO] (positive integers, 0 <= RATIO <= 1), "
        f"got {text!r}"
    )


def _hidden(text: str) -> tuple[int, ...]:
    """``"200,200"`` -> ``(200, 200)``."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(width < 1 for width in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths such as 200,200, got {text!r}"
        )
    return widths


def _registry_name(registry: Registry) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return registry.normalise(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = registry.kind
    return parse


def _model_name(sampled: bool) -> Callable[[str], str]:
    """``--model`` of ``pvae sample`` (``sampled``: the models with weights to sample) or of
    ``train``/``compare`` (the others)."""
    parse_name = _registry_name(MODELS)

    def parse(text: str) -> str:
        name = parse_name(text)
        if MODELS[name].sampled == sampled:
            return name
        if sampled:
            raise argparse.ArgumentTypeError(
                f"model {name!r} has no weights with a prior to sample (its latents are "
                "per-datapoint codes under a network that only 'pvae train' fits); "
                f"'pvae sample' takes {', '.join(_model_names(sampled=True))}"
            )
        raise argparse.ArgumentTypeError(
            f"model {name!r} is sampled, not trained: use 'pvae sample --model {name}'"
        )

    parse.__name__ = "model"
    return parse


def _model_names(sampled: bool) -> list[str]:
    return [entry.name for entry in MODELS.entries() if entry.sampled == sampled]


def _bound(text: str) -> str:
    """One bound, ``NAME[-stl|-dreg][:MxK|:BETA]``, in its canonical spelling."""
    try:
        return parse_bound(text).label
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_bound.__name__ = "bound"


def _bounds(text: str) -> list[str]:
    """Comma-separated bounds, e.g. ``elbo,iwae,miwae:8x8``."""
    return [_bound(part) for part in text.split(",")]


_bounds.__name__ = "bounds"


def _loggers(text: str) -> list[str]:
    """``--log``: comma-separated logger names of :data:`pvae.tracking.LOGGERS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in tracking.LOGGERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown logger {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(tracking.LOGGERS)} (several separated by commas)"
        )
    return list(dict.fromkeys(names))


def _add_log_argument(parser: Any, what: str) -> None:
    """``--log tensorboard|mlflow``: experiment tracking (:mod:`pvae.tracking`)."""
    parser.add_argument(
        "--log",
        type=_loggers,
        default=None,
        metavar="LOGGER",
        help=f"also log {what} to tensorboard (into DIR/tensorboard) or mlflow (into the file "
        "store DIR/mlruns, or MLFLOW_TRACKING_URI when set); both: tensorboard,mlflow "
        "(needs pip install 'pyro-vae[tensorboard]' or 'pyro-vae[mlflow]')",
    )


def _open_loggers(args: argparse.Namespace, run_dir: Path, **options: Any) -> Any:
    """The loggers of ``--log`` (a context manager); a missing package is a usage error."""
    try:
        return tracking.open_loggers(args.log, run_dir, params=_json_args(args), **options)
    except ImportError as error:
        raise CliError(f"--log: {error}") from error


def _dataset_name(text: str) -> str:
    names = [info.name for info in data.available()]
    key = text.strip().lower().replace("_", "-")  # as pvae.data.load matches names
    if key not in names:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; valid choices: {', '.join(names)}"
        )
    return key


def _likelihood_name(text: str) -> str:
    if text not in likelihoods.available():
        raise argparse.ArgumentTypeError(
            f"unknown likelihood {text!r}; valid choices: {', '.join(likelihoods.available())}"
        )
    return text


_BINARIZE = runs.BINARIZE


# ---------------------------------------------------------------------------------------------
# Shared argument groups (train now; compare and diagnose later)
# ---------------------------------------------------------------------------------------------


def _default(name: str, value: Any, quick: dict[str, Any] | None) -> str:
    """``(default: ...)`` for a help text. ``value`` None: the command resolves it from
    ``pvae.compare.DEFAULTS``, or ``quick`` under ``--quick``."""

    def show(item: Any) -> str:
        return ",".join(map(str, item)) if isinstance(item, tuple | list) else str(item)

    if value is not None:
        return f"(default: {show(value)})"
    shown = f"(default: {show(compare.DEFAULTS[name])}"
    if quick is not None:
        shown += f"; {show(quick[name])} with --quick"
    return shown + ")"


def _add_data_arguments(parser: argparse.ArgumentParser, dataset: str | None = None) -> None:
    """``--dataset`` (required unless ``dataset`` gives a default), ``--data-path``,
    ``--binarize``, ``--seed``."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        required=dataset is None,
        default=dataset,
        type=_dataset_name,
        metavar="NAME",
        help="a dataset from 'pvae datasets'"
        + (f" {_default('dataset', dataset, None)}" if dataset else ""),
    )
    group.add_argument(
        "--data-path",
        default=None,
        metavar="DIR",
        help="folder of the IDX files for datasets read from files (mnist, fashion-mnist)",
    )
    group.add_argument(
        "--binarize",
        choices=sorted(_BINARIZE),
        default=None,
        help="binarisation of image datasets (default: the dataset's, dynamic for images)",
    )
    group.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seeds the data split, the initialisation and the training (default: 0)",
    )


def _add_model_arguments(
    parser: argparse.ArgumentParser,
    z_dim: int | None = 20,
    hidden: tuple[int, ...] | None = (200, 200),
    quick: dict[str, Any] | None = None,
    sampled: bool = False,
) -> None:
    """``--model``, ``--z-dim``, ``--hidden``, ``--net``, ``--likelihood``. A None default is
    resolved by the command (``quick``: the values it takes under ``--quick``). ``sampled``:
    the models of ``pvae sample`` (:attr:`~pvae.app.registry.ModelEntry.sampled`), else the
    trained ones."""
    group = parser.add_argument_group("model")
    names = _model_names(sampled)
    group.add_argument(
        "--model",
        type=_model_name(sampled),
        default=names[0] if sampled else "vae",
        metavar="NAME",
        help=f"one of: {', '.join(names)} (default: {names[0] if sampled else 'vae'})",
    )
    group.add_argument(
        "--z-dim",
        type=_positive_int,
        default=z_dim,
        help=f"latent dimension {_default('z_dim', z_dim, quick)}",
    )
    group.add_argument(
        "--hidden",
        type=_hidden,
        default=hidden,
        metavar="W1,W2,...",
        help=f"hidden layer widths {_default('hidden', hidden, quick)}",
    )
    group.add_argument(
        "--net", choices=["mlp", "conv"], default="mlp", help="network kind (default: mlp)"
    )
    group.add_argument(
        "--likelihood",
        type=_likelihood_name,
        default=None,
        metavar="NAME",
        help=f"one of: {', '.join(likelihoods.available())} (default: the dataset's, "
        "bernoulli for binarised images)",
    )
    for entry in MODELS.entries():
        if not entry.options or entry.sampled != sampled:
            continue
        options = parser.add_argument_group(f"options of --model {entry.name}")
        for option in entry.options:
            options.add_argument(
                entry.flag(option),
                dest=entry.dest(option),
                type=_option_type(option),
                default=None,
                metavar=option.name.upper(),
                help=f"{option.help} (default: {option.default})",
            )


def _option_type(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = option.type(text)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if option.choices is not None and value not in option.choices:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(map(str, option.choices))}, got {text!r}"
            )
        return value

    parse.__name__ = option.name
    return parse


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``args.model`` given on the command line; an option of another model
    is refused."""
    given: dict[str, Any] = {}
    for entry in MODELS.entries():
        for option in entry.options:
            value = getattr(args, entry.dest(option), None)
            if value is None:
                continue
            if entry.name != args.model:
                raise CliError(
                    f"{entry.flag(option)} is an option of --model {entry.name}, not {args.model}"
                )
            given[option.name] = value
    return given


def _add_training_arguments(
    parser: argparse.ArgumentParser,
    epochs: int | None = 10,
    particles: int | None = 1,
    ll_samples: int | None = 1000,
    batch_size: int = 100,
    quick: dict[str, Any] | None = None,
    particles_help: str = "particles (samples of z) per datapoint for the engine",
    resumable: bool = True,
) -> None:
    """``--epochs``, ``--batch-size``, ``--lr``, ``--particles``, ``--ll-samples``,
    ``--quiet``. A None default is resolved by the command (``quick``: as for the model)."""
    group = parser.add_argument_group("training and evaluation")
    group.add_argument(
        "--epochs",
        type=_positive_int,
        default=epochs,
        help="total epochs"
        + ("; with --resume, training continues up to this many " if resumable else " ")
        + _default("epochs", epochs, quick),
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        help=f"datapoints per step {_default('batch_size', batch_size, None)}",
    )
    group.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)"
    )
    group.add_argument(
        "--particles",
        type=_positive_int,
        default=particles,
        help=f"{particles_help} "
        + (
            _default("particles", particles, None)
            if particles is not None
            else "(default: the engine's: "
            + ", ".join(f"{e.name} {e.default_particles}" for e in ENGINES.entries())
            + "; MxK implies M*K)"
        ),
    )
    group.add_argument(
        "--ll-samples",
        type=_positive_int,
        default=ll_samples,
        metavar="K",
        help="importance samples per test point for the log-likelihood "
        + _default("ll_samples", ll_samples, quick),
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars and no per-epoch lines (the final result is still printed)",
    )


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


def _build(config: runs.RunConfig, ds: data.Splits) -> PyroModule:
    """``config.build_model(ds)``; a refusal becomes :class:`CliError`."""
    try:
        return config.build_model(ds)
    except ValueError as error:
        raise CliError(f"model {config.model!r}: {error}") from error


def _engine(config: runs.RunConfig) -> pyro.infer.ELBO:
    """``config.build_engine()``; a refusal becomes :class:`CliError`."""
    try:
        return config.build_engine()
    except ValueError as error:
        raise CliError(f"engine {config.engine!r}: {error}") from error


def _folder(run_dir: str | Path) -> runs.RunFolder:
    """The checked :class:`~pvae.app.runs.RunFolder` of ``--run-dir``."""
    try:
        return runs.RunFolder(run_dir)
    except runs.RunFolderError as error:
        raise CliError(str(error)) from error


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


def _refuse_run(folder: runs.RunFolder, resume: bool, overwrite: bool | None) -> None:
    try:
        folder.refuse_run(resume, overwrite)
    except runs.RunFolderError as error:
        raise CliError(str(error)) from error


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


def _check_support(model: PyroModule, ds: data.Splits) -> None:
    """Every split must lie in the support of ``model.likelihood`` (checked once, up front)."""
    try:
        compare.check_support(model, ds)
    except ValueError as error:
        raise CliError(str(error)) from error


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
    _figures(result.model, ds, args.seed, run_dir)
    return metrics


def _figures(model: PyroModule, ds: data.Splits, seed: int, run_dir: Path) -> None:
    """``reconstructions.png`` and ``samples.png`` where the model has ``reconstruct`` and
    ``sample(num_samples)``. A model over several tensors shows the first modality (its
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
        sample = getattr(model, "sample", None)
        parameters = list(inspect.signature(sample).parameters) if callable(sample) else []
        if callable(sample) and parameters[:1] == ["num_samples"]:
            count = 64 if ds.image_shape is not None else 500
            drawn = sample(count)
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


def _add_datasets_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _datasets(args: argparse.Namespace) -> int:
    rows = [("NAME", "DESCRIPTION", "SOURCE")]
    rows += [(info.name, info.description, info.source) for info in data.available()]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    for name, description, source in rows:
        print(f"{name:<{widths[0]}}  {description:<{widths[1]}}  {source}".rstrip())
    return EXIT_OK


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser)
    group = parser.add_argument_group("subset")
    group.add_argument(
        "--max-train",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on the first N training points (sequences) only (default: all)",
    )
    group.add_argument(
        "--max-eval",
        type=_positive_int,
        default=None,
        metavar="N",
        help="validate and test on the first N points (sequences) of each split (default: all)",
    )
    _add_model_arguments(parser)
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        type=_bound,
        default="elbo",
        metavar="BOUND",
        help=f"one of: {', '.join(ENGINES.names())}, written as {_grammar()} (default: elbo)",
    )
    group.add_argument(
        "--beta-schedule",
        type=_beta_schedule,
        default=None,
        metavar="SCHEDULE",
        help="anneal the ELBO's KL weight over training steps: linear:STEPS (Bowman et al. 2016) "
        "or cyclical:PERIOD[:RATIO] (Fu et al. 2019) (default: none, beta = 1)",
    )
    _add_training_arguments(parser, particles=None)
    group = parser.add_argument_group("run folder")
    group.add_argument(
        "--run-dir",
        required=True,
        metavar="DIR",
        help="where config, checkpoint, metrics and plots are written",
    )
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR from its checkpoint up to --epochs",
    )
    exclusive.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if DIR already holds a run",
    )
    _add_log_argument(group, "every step and epoch, the config and the outputs")


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
        _refuse_run(folder, args.resume, args.overwrite)
    if args.particles is None:
        args.particles = parse_bound(args.engine).default_particles()
    config = _config("train", args)
    ds = _load(config, args)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    _check_memory(args, ds)
    model = _build(config, ds)
    engine = _engine(config)
    _check_support(model, ds)
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


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser, dataset="mnist5k")
    _add_model_arguments(parser, z_dim=None, hidden=None, quick=compare.QUICK)
    group = parser.add_argument_group("bounds")
    group.add_argument(
        "--bounds",
        type=_bounds,
        default=list(compare.DEFAULT_BOUNDS),
        metavar="B1,B2,...",
        help=f"comma-separated bounds, each {_grammar()} "
        f"(default: {','.join(compare.DEFAULT_BOUNDS)})",
    )
    group.add_argument(
        "--inner",
        type=_positive_int,
        default=None,
        metavar="K",
        help="K of miwae and piwae written without MxK; M = --particles / K "
        "(default: K = M = sqrt(--particles))",
    )
    _add_training_arguments(
        parser,
        epochs=None,
        particles=64,
        ll_samples=None,
        batch_size=20,
        quick=compare.QUICK,
        particles_help="samples of z per datapoint and step, the same for every bound",
        resumable=False,
    )
    group = parser.add_argument_group("diagnostics and output")
    group.add_argument(
        "--snr-repeats",
        type=lambda text: _int(text, 2),
        default=None,
        metavar="N",
        help="gradients per bound for the gradient signal-to-noise ratio "
        + _default("snr_repeats", None, compare.QUICK),
    )
    group.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="where results.md/.json/.csv, the plots and one checkpoint folder per bound are "
        "written (default: runs/compare-DATASET)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier comparison in DIR (its results, plots and bound folders; "
        "nothing else)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted comparison in DIR: only its unfinished cells (bound, "
        "seed) run, each from its own checkpoint",
    )
    group.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the cells (bound, seed) in N local processes (default: 1, this process)",
    )
    group.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: --jobs processes on this machine; ray: one Ray task per cell, on the "
        'cluster of RAY_ADDRESS or a local Ray instance (pip install "pyro-vae[ray]")',
    )
    group.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run in under a minute: {runs.QUICK_LIMITS['max_train']} training and "
        f"{runs.QUICK_LIMITS['max_eval']} valid/test points and the --quick defaults above",
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch's intra-op threads (default: torch's own, one per core; on a machine "
        "busy with other jobs, 1 is often several times faster)",
    )
    group.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        metavar="S1,S2,...",
        help="train every bound once per seed (one run folder per bound and seed, "
        "BOUND/seed-S); the table gives mean ± sd over seeds and the per-seed paired Δ to the "
        "first bound (default: --seed alone, one folder per bound)",
    )
    group.add_argument(
        "--yardstick",
        type=_yardstick,
        default=compare.YARDSTICK,
        metavar="iwae:K|elbo:K|none",
        help="the estimator every bound's model is evaluated with on "
        f"{compare.YARDSTICK_POINTS} validation points after every epoch, for learning curves "
        f"that compare like with like (default: {compare.YARDSTICK})",
    )
    group.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda", "mps"],
        help="where the models train and are evaluated (default: cpu)",
    )
    _add_log_argument(group, "one run per bound (steps, epochs, its results) and the results")


def _seeds(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}")
    seeds = [_seed(item) for item in items]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def _yardstick(text: str) -> str:
    try:
        compare.parse_yardstick(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


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
    _check_support(model, ds)
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


def _add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder of 'pvae train' (config.json, checkpoint.pt) or 'pvae compare' "
        "(results.json and one folder per bound)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where diagnostics.md and the plots are written (default: RUN_DIR)",
    )
    parser.add_argument(
        "--points",
        type=_positive_int,
        default=500,
        metavar="N",
        help="test points the diagnostics use, the first N (default: 500)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="only the final line (no verdict, no per-bound lines)"
    )


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


def _friction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser)
    _add_model_arguments(parser, z_dim=10, hidden=(100,), sampled=True)
    group = parser.add_argument_group("sampling (SGHMC over every latent site)")
    group.add_argument(
        "--num-samples", type=_positive_int, default=100, help="draws kept per chain (default: 100)"
    )
    group.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=500,
        help="warm-up steps per chain (default: 500)",
    )
    group.add_argument(
        "--thin", type=_positive_int, default=1, help="keep every THIN-th step (default: 1)"
    )
    group.add_argument(
        "--chains",
        type=_positive_int,
        default=SAMPLE_CHAINS,
        help=f"chains, one after another; R-hat needs at least 2 (default: {SAMPLE_CHAINS})",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=100, help="datapoints per step (default: 100)"
    )
    group.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="SGHMC learning rate per datapoint; the step is lr / N "
        f"(default: SGHMC's, {_sampler_default('lr')})",
    )
    group.add_argument(
        "--friction",
        type=_friction,
        default=None,
        help=f"SGHMC friction in (0, 1] (default: SGHMC's, {_sampler_default('friction')})",
    )
    group.add_argument(
        "--init-radius",
        type=_positive_float,
        default=None,
        help="chains start with unconstrained values uniform in (-R, R) (default: SGHMC's, "
        f"{_sampler_default('init_radius')}; 0.1 starts a network's weights small, as its "
        "initialisation does, and reconstructs better given a warm-up of hundreds of steps)",
    )
    group.add_argument(
        "--max-train",
        type=_positive_int,
        default=None,
        metavar="N",
        help="sample on the first N training points only (default: all)",
    )
    group = parser.add_argument_group("run folder")
    group.add_argument("--run-dir", required=True, metavar="DIR", help="where the run is written")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in DIR from its checkpoint (bit-identical samples)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=SAMPLE_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="steps between checkpoints within a chain; one is also written after every chain "
        f"and on Ctrl-C (default: {SAMPLE_CHECKPOINT_EVERY})",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")


SAMPLE_CHAINS = 4
SAMPLE_CHECKPOINT_EVERY = 1000
# Arguments of ``pvae sample`` that may change between a run and its --resume.
_SAMPLE_RESUMABLE = {"resume", "quiet", "run_dir", "data_path", "checkpoint_every"}


def _folder_command(run_dir: Path) -> str | None:
    """The command that wrote ``run_dir`` (its config.json's ``command``, else its
    checkpoint's kind), None for a folder without a pvae run."""
    try:
        command = json.loads((run_dir / runs.CONFIG).read_text()).get("command")
        if isinstance(command, str):
            return command
    except (OSError, ValueError, AttributeError):
        pass
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
    _refuse_run(folder, args.resume, None)
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
    _check_support(model, ds)
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


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, its arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command(
        "compare",
        "train one model once per bound (same seed, data and particles) and compare them",
        _add_compare_arguments,
        _compare,
    ),
    Command(
        "diagnose",
        "diagnose a trained run: posterior collapse, latent relevance and traversals",
        _add_diagnose_arguments,
        _diagnose,
    ),
    Command(
        "train", "train one model with one engine and evaluate it", _add_train_arguments, _train
    ),
    Command("datasets", "list the datasets", _add_datasets_arguments, _datasets),
    Command(
        "sample",
        "sample a model's weights with SGHMC (e.g. --model bae) and save the posterior",
        _add_sample_arguments,
        _sample,
    ),
]


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``pvae`` parser with one subparser per :data:`COMMANDS` entry."""
    parser = _Parser(
        prog=PROG,
        description="Probabilistic-programming VAEs on Pyro.",
        epilog="Set PVAE_DEBUG=1 to see tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {pvae.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(func=command.run)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pvae`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else EXIT_OK
        return int(args.func(args))
    except CliError as error:
        if os.environ.get("PVAE_DEBUG"):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling: nothing to save
        if os.environ.get("PVAE_DEBUG"):
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

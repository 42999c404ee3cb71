"""The arguments of the ``pvae`` command line, and its entry point :func:`main`.

Parsing imports neither torch nor Pyro: ``pvae --help``, ``pvae <command> --help`` and every
argument error answer in the time Python starts. What the parser must know of modules that
import torch (the models' options, the datasets, the likelihoods, the compare and sampler
defaults) it reads from :mod:`pvae.app._index`, generated from those sources (``python -m
pvae.app.index``; a test fails when it is stale), or from the modules themselves where they are
imported already (a model or dataset registered at run time is then on the command line too).
A command's own module is imported only once its arguments have parsed (:attr:`Command.run`).

Each command's options are declared as data (:class:`_Arg`, in groups) and added in one loop.
Every argument type raises ``argparse.ArgumentTypeError`` with a message argparse shows as it
is; every error becomes one line ``pvae: error: ...`` and exit status 2 (:class:`CliError`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import pvae
from pvae.app import _index
from pvae.app.registry import (
    ENGINES,
    MODELS,
    Integer,
    ModelInfo,
    Option,
    Real,
    bound_grammar,
    parse_bound,
    parse_yardstick,
)

EXIT_OK = 0
EXIT_FAILURE = 1  # the run itself failed (diverged, ...)
EXIT_USAGE = 2  # the invocation cannot work as given (argparse's status)

PROG = "pvae"
WIDTH = 100  # columns of the help and of `pvae datasets`

SAMPLE_CHAINS = 4
SAMPLE_CHECKPOINT_EVERY = 1000


class CliError(Exception):
    """An error reported as one line ``pvae: error: <message>`` and exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`CliError` (one line, no usage dump), with
    help wrapped to :data:`WIDTH` columns at most."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)

    def _get_formatter(self) -> argparse.HelpFormatter:
        width = min(WIDTH, shutil.get_terminal_size().columns) - 2
        return self.formatter_class(prog=self.prog, width=width)  # type: ignore[call-arg]


# -- What the parser knows: the live modules where they are imported, else the generated index ---


def model_infos(sampled: bool | None = None) -> list[ModelInfo]:
    """The models (their :class:`~pvae.app.registry.ModelInfo`), in registration order;
    ``sampled``: only those that are (True) or are not (False) sampled."""
    infos = MODELS.entries() if MODELS.loaded else list(_index.MODELS)
    return [info for info in infos if sampled is None or info.sampled == sampled]


def _model_info(name: str) -> ModelInfo:
    return next(info for info in model_infos() if info.name == name)


def dataset_infos() -> list[tuple[str, str, str]]:
    """``(name, description, source)`` of every dataset of :mod:`pvae.data`."""
    data = sys.modules.get("pvae.data")
    if data is None:
        return list(_index.DATASETS)
    return [(info.name, info.description, info.source) for info in data.available()]


def likelihood_names() -> list[str]:
    likelihoods = sys.modules.get("pvae.likelihoods")
    return list(likelihoods.available() if likelihoods is not None else _index.LIKELIHOODS)


# -- Argument types ------------------------------------------------------------------------


def _argument_type(
    parse: Callable[[str], Any], expected: str | None = None
) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError or TypeError becomes an
    ``ArgumentTypeError`` with its own message, or ``expected <expected>, got <text>``."""

    def checked(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError) as error:
            message = str(error) if expected is None else f"expected {expected}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return checked


def _one_of(
    kind: str, names: Callable[[], list[str]], key: Callable[[str], str] = str
) -> Callable[[str], Any]:
    """A name among ``names()`` once ``key`` has normalised it."""

    def parse(text: str) -> str:
        if key(text) not in names():
            raise ValueError(f"unknown {kind} {text!r}; valid choices: {', '.join(names())}")
        return key(text)

    return _argument_type(parse)


def _schedule(text: str) -> str:
    """``linear:STEPS`` or ``cyclical:PERIOD[:RATIO]`` (checked; kept as written)."""
    kind, *parts = text.split(":")
    if len(parts) not in {"linear": (1,), "cyclical": (1, 2)}.get(kind, ()):
        raise ValueError(text)
    Integer(1)(parts[0])
    if len(parts) == 2:
        Real(0.0, 1.0)(parts[1])
    return text


def _seeds(text: str) -> list[int]:
    seeds = [_SEED(item.strip()) for item in text.split(",") if item.strip()]
    if not seeds:
        raise ValueError(f"expected comma-separated seeds, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed is given twice in {text!r}")
    return seeds


def _yardstick(text: str) -> str:
    parse_yardstick(text)
    return text


def _loggers(text: str) -> list[str]:
    """``--log``: comma-separated logger names of :data:`pvae.tracking.LOGGERS`."""
    from pvae.tracking import LOGGERS  # no torch

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise ValueError(
            f"unknown logger {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(LOGGERS)} (several separated by commas)"
        )
    return list(dict.fromkeys(names))


def _model_name(sampled: bool) -> Callable[[str], str]:
    """``--model`` of ``pvae sample`` (``sampled``: the models with weights to sample) or of
    ``train``/``compare`` (the others)."""
    known = _one_of("model", lambda: [i.name for i in model_infos()], lambda t: t.strip().lower())

    def parse(text: str) -> str:
        name = known(text)
        if _model_info(name).sampled == sampled:
            return name
        if sampled:
            raise argparse.ArgumentTypeError(
                f"model {name!r} has no weights with a prior to sample (its latents are "
                "per-datapoint codes under a network that only 'pvae train' fits); "
                f"'pvae sample' takes {', '.join(i.name for i in model_infos(sampled=True))}"
            )
        raise argparse.ArgumentTypeError(
            f"model {name!r} is sampled, not trained: use 'pvae sample --model {name}'"
        )

    return parse


_POSITIVE = _argument_type(Integer(1), "a positive integer")
_NON_NEGATIVE = _argument_type(Integer(0))
_JOBS = _argument_type(
    lambda text: text if text == "auto" else Integer(1)(text), "'auto' or a positive integer"
)
_SEED = _argument_type(
    Integer(0, _index.MAX_SEED), f"an integer in [0, {_index.MAX_SEED}] (numpy's limit)"
)
_POSITIVE_REAL = _argument_type(Real(0.0, open_below=True), "a positive number")
_FRICTION = _argument_type(Real(0.0, 1.0, open_below=True), "a number in (0, 1]")
_HIDDEN = _argument_type(
    lambda text: tuple(map(Integer(1), text.split(","))),
    "comma-separated positive layer widths such as 200,200",
)
_SCHEDULE = _argument_type(
    _schedule,
    "linear:STEPS or cyclical:PERIOD[:RATIO] (positive integers, 0 <= RATIO <= 1)",
)
_BOUND = _argument_type(lambda text: parse_bound(text).label)
_BOUNDS = _argument_type(lambda text: [parse_bound(part).label for part in text.split(",")])
_YARDSTICK = _argument_type(_yardstick)
_DATASET = _one_of(
    "dataset",
    lambda: [name for name, _, _ in dataset_infos()],
    lambda text: text.strip().lower().replace("_", "-"),  # as pvae.data.load matches names
)


def _check_model_options(args: argparse.Namespace) -> None:
    """Refuse an option of another model than ``args.model``."""
    for info in model_infos():
        for option in info.options:
            if info.name != args.model and getattr(args, info.dest(option), None) is not None:
                raise CliError(
                    f"{info.flag(option)} is an option of --model {info.name}, not {args.model}"
                )


def _check_engines(args: argparse.Namespace) -> None:
    """Refuse a bound whose engine requires a capability ``args.model`` lacks (``--engine
    kalman`` with a model whose guide is not Kalman-smoothed)."""
    model = getattr(args, "model", None)
    bounds = getattr(args, "bounds", None) or [getattr(args, "engine", None)]
    if model is None:
        return
    capabilities = _model_info(model).capabilities
    for bound in filter(None, bounds):
        entry = ENGINES[parse_bound(bound).name]
        if entry.requires is not None and entry.requires not in capabilities:
            takers = [i.name for i in model_infos() if entry.requires in i.capabilities]
            raise CliError(
                f"the {entry.name} engine applies to models with a {entry.requires} guide "
                f"({', '.join(takers)}), not to --model {model}"
            )


# -- The options, as data ------------------------------------------------------------------


class _Arg(NamedTuple):
    """One option: its ``flag`` (``"--flag METAVAR"``, or a positional's ``"name METAVAR"``),
    its ``help``, parsed by ``type`` (None: kept as text); the rest as for
    ``ArgumentParser.add_argument`` (None and False: not given). ``(default: ...)`` is added to
    the help unless it says the default itself or the default is None or a bool."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[str] | None = None
    action: str | None = None
    required: bool = False
    dest: str | None = None


def _switch(flag: str, help: str) -> _Arg:
    return _Arg(flag, help, action="store_true")


def _show(item: Any) -> str:
    return ",".join(map(str, item)) if isinstance(item, tuple | list) else str(item)


def _default(name: str, value: Any, quick: dict[str, Any] | None) -> str:
    """``(default: ...)`` for a help text. ``value`` None: the command resolves it from
    ``pvae.compare.DEFAULTS``, or ``quick`` under ``--quick``."""
    if value is not None:
        return f"(default: {_show(value)})"
    shown = f"(default: {_show(_index.COMPARE_DEFAULTS[name])}"
    if quick is not None:
        shown += f"; {_show(quick[name])} with --quick"
    return shown + ")"


def _add(container: Any, title: str | None, *arguments: _Arg) -> Any:
    """Add ``arguments`` to ``container``, in a new group ``title`` unless None; returns the
    group (or ``container``)."""
    group = container.add_argument_group(title) if title else container
    for arg in arguments:
        keywords = {k: v for k, v in arg._asdict().items() if v is not None and v is not False}
        flag, _, metavar = keywords.pop("flag").partition(" ")
        if metavar:
            keywords["metavar"] = metavar
        shown = arg.default is not None and not isinstance(arg.default, bool)
        if shown and "(default" not in arg.help:
            keywords["help"] = f"{arg.help} (default: {_show(arg.default)})"
        group.add_argument(flag, **keywords)
    return group


def _log(what: str) -> _Arg:
    """``--log tensorboard|mlflow``: experiment tracking (:mod:`pvae.tracking`)."""
    return _Arg(
        "--log LOGGER",
        f"also log {what} to tensorboard (into DIR/tensorboard) or mlflow (into the file "
        "store DIR/mlruns, or MLFLOW_TRACKING_URI when set); both: tensorboard,mlflow "
        "(needs pip install 'pyro-vae[tensorboard]' or 'pyro-vae[mlflow]')",
        _argument_type(_loggers),
    )


def _data_arguments(parser: argparse.ArgumentParser, dataset: str | None = None) -> None:
    """``--dataset`` (required unless ``dataset`` gives a default), ``--data-path``,
    ``--binarize``, ``--seed``."""
    _add(
        parser,
        "data",
        _Arg(
            "--dataset NAME",
            "a dataset from 'pvae datasets'",
            _DATASET,
            dataset,
            required=dataset is None,
        ),
        _Arg(
            "--data-path DIR",
            "folder of the IDX files for datasets read from files (mnist, fashion-mnist)",
        ),
        _Arg(
            "--binarize",
            "binarisation of image datasets (default: the dataset's, dynamic for images)",
            choices=_index.BINARIZE,
        ),
        _Arg("--seed", "seeds the data split, the initialisation and the training", _SEED, 0),
    )


def _model_arguments(
    parser: argparse.ArgumentParser,
    z_dim: int | None = 20,
    hidden: tuple[int, ...] | None = (200, 200),
    quick: dict[str, Any] | None = None,
    sampled: bool = False,
) -> None:
    """``--model``, ``--z-dim``, ``--hidden``, ``--net``, ``--likelihood`` and every model's
    own options. A None default is resolved by the command (``quick``: the values it takes
    under ``--quick``). ``sampled``: the models of ``pvae sample``, else the trained ones."""
    names = [info.name for info in model_infos(sampled)]
    likelihoods = f"one of: {', '.join(likelihood_names())}"
    _add(
        parser,
        "model",
        _Arg(
            "--model NAME",
            f"one of: {', '.join(names)}",
            _model_name(sampled),
            names[0] if sampled else "vae",
        ),
        _Arg("--z-dim", f"latent dimension {_default('z_dim', z_dim, quick)}", _POSITIVE, z_dim),
        _Arg(
            "--hidden W1,W2,...",
            f"hidden layer widths {_default('hidden', hidden, quick)}",
            _HIDDEN,
            hidden,
        ),
        _Arg("--net", "network kind", None, "mlp", choices=["mlp", "conv"]),
        _Arg(
            "--likelihood NAME",
            f"{likelihoods} (default: the dataset's, bernoulli for binarised images)",
            _one_of("likelihood", likelihood_names),
        ),
    )
    for info in model_infos(sampled):
        if info.options:
            arguments = [_model_option(info, option) for option in info.options]
            _add(parser, f"options of --model {info.name}", *arguments)


def _model_option(info: ModelInfo, option: Option) -> _Arg:
    """``--<model>-<option>``: parsed by the option, default None (the model's default)."""
    values = option.values
    metavar = "{" + ",".join(map(str, values)) + "}" if values else option.name.upper()
    help = f"{option.help} (default: {option.default})"
    return _Arg(
        f"{info.flag(option)} {metavar}", help, _argument_type(option.parse), dest=info.dest(option)
    )


def _training_arguments(
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
    engines = ", ".join(f"{e.name} {e.default_particles}" for e in ENGINES.entries())
    epochs_help = "; with --resume, training continues up to this many " if resumable else " "
    if particles is None:
        particles_help += f" (default: the engine's: {engines}; MxK implies M*K)"
    _add(
        parser,
        "training and evaluation",
        _Arg(
            "--epochs",
            f"total epochs{epochs_help}{_default('epochs', epochs, quick)}",
            _POSITIVE,
            epochs,
        ),
        _Arg("--batch-size", "datapoints per step", _POSITIVE, batch_size),
        _Arg("--lr", "Adam learning rate (default: 1e-3)", _POSITIVE_REAL, 1e-3),
        _Arg("--particles", particles_help, _POSITIVE, particles),
        _Arg(
            "--ll-samples K",
            "importance samples per test point for the log-likelihood "
            + _default("ll_samples", ll_samples, quick),
            _POSITIVE,
            ll_samples,
        ),
        _switch(
            "--quiet", "no progress bars and no per-epoch lines (the final result is still printed)"
        ),
    )


# -- The commands' arguments ---------------------------------------------------------------


def _datasets(args: argparse.Namespace) -> int:
    """The datasets, one per row: the name, then the description and the source wrapped to
    :data:`WIDTH` columns beside it."""
    rows = dataset_infos()
    indent = max(len(name) for name, _, _ in rows) + 2
    print(f"{'NAME':<{indent}}DESCRIPTION (SOURCE)")
    for name, description, source in rows:
        lines = textwrap.wrap(description, WIDTH - indent)
        lines += textwrap.wrap(f"source: {source}", WIDTH - indent)
        print(f"{name:<{indent}}{lines[0]}")
        for line in lines[1:]:
            print(" " * indent + line)
    return EXIT_OK


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser)
    _add(
        parser,
        "subset",
        _Arg(
            "--max-train N",
            "train on the first N training points (sequences) only (default: all)",
            _POSITIVE,
        ),
        _Arg(
            "--max-eval N",
            "validate and test on the first N points (sequences) of each split (default: all)",
            _POSITIVE,
        ),
    )
    _model_arguments(parser)
    _add(
        parser,
        "engine",
        _Arg(
            "--engine BOUND",
            f"one of: {', '.join(ENGINES.names())}, written as {bound_grammar()}",
            _BOUND,
            "elbo",
        ),
        _Arg(
            "--beta-schedule SCHEDULE",
            "anneal the ELBO's KL weight over training steps: "
            "linear:STEPS (Bowman et al. 2016) or cyclical:PERIOD[:RATIO] (Fu et al. 2019) "
            "(default: none, beta = 1)",
            _SCHEDULE,
        ),
    )
    _training_arguments(parser, particles=None)
    run_dir = "where config, checkpoint, metrics and plots are written"
    group = _add(parser, "run folder", _Arg("--run-dir DIR", run_dir, required=True))
    _add(
        group.add_mutually_exclusive_group(),
        None,
        _switch("--resume", "continue the run in DIR from its checkpoint up to --epochs"),
        _switch("--overwrite", "start afresh even if DIR already holds a run"),
    )
    _add(group, None, _log("every step and epoch, the config and the outputs"))


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    quick = _index.COMPARE_QUICK
    _data_arguments(parser, dataset="mnist5k")
    _model_arguments(parser, z_dim=None, hidden=None, quick=quick)
    _add(
        parser,
        "bounds",
        _Arg(
            "--bounds B1,B2,...",
            f"comma-separated bounds, each {bound_grammar()}",
            _BOUNDS,
            list(_index.DEFAULT_BOUNDS),
        ),
        _Arg(
            "--inner K",
            "K of miwae and piwae written without MxK; M = --particles / K "
            "(default: K = M = sqrt(--particles))",
            _POSITIVE,
        ),
    )
    _training_arguments(
        parser,
        epochs=None,
        particles=64,
        ll_samples=None,
        batch_size=20,
        quick=quick,
        particles_help="samples of z per datapoint and step, the same for every bound",
        resumable=False,
    )
    _add(parser, "diagnostics and output", *_compare_output_arguments(quick))


def _compare_output_arguments(quick: dict[str, Any]) -> list[_Arg]:
    """``pvae compare``'s diagnostics, run folder, seeds, devices and executors."""
    limits = _index.QUICK_LIMITS
    return [
        _Arg(
            "--snr-repeats N",
            "gradients per bound for the gradient signal-to-noise ratio "
            + _default("snr_repeats", None, quick),
            _argument_type(Integer(2)),
        ),
        _Arg(
            "--run-dir DIR",
            "where results.md/.json/.csv, the plots and one checkpoint folder "
            "per bound are written (default: runs/compare-DATASET)",
        ),
        _switch(
            "--overwrite",
            "replace an earlier comparison in DIR (its results, plots and "
            "bound folders; nothing else)",
        ),
        _switch(
            "--resume",
            "continue an interrupted comparison in DIR: only its unfinished "
            "cells (bound, seed) run, each from its own checkpoint",
        ),
        _switch(
            "--quick",
            f"a smoke run in under a minute: {limits['max_train']} training and "
            f"{limits['max_eval']} valid/test points and the --quick defaults above",
        ),
        _Arg(
            "--threads N",
            "torch's intra-op threads (default: torch's own, one per core; on a "
            "machine busy with other jobs, 1 is often several times faster)",
            _POSITIVE,
        ),
        _Arg(
            "--seeds S1,S2,...",
            "train every bound once per seed (one run folder per bound "
            "and seed, BOUND/seed-S); the table gives mean ± sd over seeds and the per-seed "
            "paired Δ to the first bound (default: --seed alone, one folder per bound)",
            _argument_type(_seeds),
        ),
        _Arg(
            "--yardstick iwae:K|elbo:K|none",
            "the estimator every bound's model is evaluated "
            f"with on {_index.YARDSTICK_POINTS} validation points after every epoch, for "
            "learning curves that compare like with like",
            _YARDSTICK,
            _index.YARDSTICK,
        ),
        _Arg(
            "--device",
            "where the models train and are evaluated",
            None,
            "cpu",
            choices=["cpu", "cuda", "mps"],
        ),
        _Arg(
            "--jobs N|auto",
            "processes that run the cells' tasks at once (a cell trains in one, its "
            "evaluation runs in chunks of test points across all); auto: one per core, at "
            "most one per cell, 1 with --quick",
            _JOBS,
            "auto",
        ),
        _Arg(
            "--executor",
            "where the cells run: local processes, or Ray tasks on a Ray cluster "
            "(needs pip install 'pyro-vae[ray]')",
            None,
            "local",
            choices=["local", "ray"],
        ),
        _log("one run per bound (steps, epochs, its results) and the results"),
    ]


def _diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        None,
        _Arg(
            "run_dir RUN_DIR",
            "a run folder of 'pvae train' (config.json, checkpoint.pt) or "
            "'pvae compare' (results.json and one folder per bound)",
        ),
        _Arg("--out DIR", "where diagnostics.md and the plots are written (default: RUN_DIR)"),
        _Arg("--points N", "test points the diagnostics use, the first N", _POSITIVE, 500),
        _switch("--quiet", "only the final line (no verdict, no per-bound lines)"),
    )


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    sghmc = _index.SAMPLER_DEFAULTS
    _data_arguments(parser)
    _model_arguments(parser, z_dim=10, hidden=(100,), sampled=True)
    _add(
        parser,
        "sampling (SGHMC over every latent site)",
        _Arg("--num-samples", "draws kept per chain", _POSITIVE, 100),
        _Arg("--warmup", "warm-up steps per chain", _NON_NEGATIVE, 500),
        _Arg("--thin", "keep every THIN-th step", _POSITIVE, 1),
        _Arg(
            "--chains",
            "chains, one after another; R-hat needs at least 2",
            _POSITIVE,
            SAMPLE_CHAINS,
        ),
        _Arg("--batch-size", "datapoints per step", _POSITIVE, 100),
        _Arg(
            "--lr",
            "SGHMC learning rate per datapoint; the step is lr / N (default: SGHMC's, "
            f"{sghmc['lr']})",
            _POSITIVE_REAL,
        ),
        _Arg(
            "--friction",
            f"SGHMC friction in (0, 1] (default: SGHMC's, {sghmc['friction']})",
            _FRICTION,
        ),
        _Arg(
            "--init-radius",
            "chains start with unconstrained values uniform in (-R, R) "
            f"(default: SGHMC's, {sghmc['init_radius']}; 0.1 starts a network's weights small, "
            "as its initialisation does, and reconstructs better given a warm-up of hundreds "
            "of steps)",
            _POSITIVE_REAL,
        ),
        _Arg(
            "--max-train N", "sample on the first N training points only (default: all)", _POSITIVE
        ),
    )
    _add(
        parser,
        "run folder",
        _Arg("--run-dir DIR", "where the run is written", required=True),
        _switch(
            "--resume",
            "continue the interrupted run in DIR from its checkpoint (bit-identical samples)",
        ),
        _Arg(
            "--checkpoint-every STEPS",
            "steps between checkpoints within a chain; one is also "
            "written after every chain and on Ctrl-C",
            _POSITIVE,
            SAMPLE_CHECKPOINT_EVERY,
        ),
        _switch("--quiet", "no progress bar"),
    )


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, its arguments (None: none) and what it runs:
    ``run``, ``"module:function"``, imported once the arguments have parsed."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: str

    def function(self) -> Callable[[argparse.Namespace], int]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: list[Command] = [
    Command(
        "compare",
        "train one model once per bound (same seed, data and particles) and compare them",
        _compare_arguments,
        "pvae.app.cli:_compare",
    ),
    Command(
        "diagnose",
        "diagnose a trained run: posterior collapse, latent relevance and traversals",
        _diagnose_arguments,
        "pvae.app.cli:_diagnose",
    ),
    Command(
        "train",
        "train one model with one engine and evaluate it",
        _train_arguments,
        "pvae.app.cli:_train",
    ),
    Command("datasets", "list the datasets", None, f"{__name__}:_datasets"),
    Command(
        "sample",
        "sample a model's weights with SGHMC (e.g. --model bae) and save the posterior",
        _sample_arguments,
        "pvae.app.cli:_sample",
    ),
]


# -- Entry point ---------------------------------------------------------------------------


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
        if command.add_arguments is not None:
            command.add_arguments(subparser)
        subparser.set_defaults(func=command.run, spelling=_spelling(subparser))
    return parser


def _spelling(parser: argparse.ArgumentParser) -> tuple[tuple[str, str, bool], ...]:
    """``(dest, flag, is a switch)`` of each option: what :func:`pvae.app.runs.canonical_argv`
    spells a parsed command line back with (the commands need not reach back to the parser)."""
    return tuple(
        (action.dest, action.option_strings[-1], isinstance(action, argparse._StoreTrueAction))
        for action in parser._actions
        if action.option_strings and action.dest != "help"
    )


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed ``argv``, checked across arguments (an engine the model cannot take, an
    option of another model).

    :raises CliError: for any argument error; ``SystemExit`` for ``--help``/``--version``.
    """
    args = build_parser().parse_args(argv)
    _check_engines(args)
    if getattr(args, "model", None) is not None:
        _check_model_options(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pvae`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else EXIT_OK
        command = next(c for c in COMMANDS if c.name == args.command)
        return int(command.function()(args))
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
    except BrokenPipeError:  # the reader left (`pvae datasets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # 128 + SIGPIPE, as a process the signal ended


if __name__ == "__main__":
    sys.exit(main())

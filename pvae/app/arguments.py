"""The arguments of the ``pvae`` command line, and its entry point :func:`main`.

Parsing imports neither torch nor Pyro: ``pvae --help``, ``pvae <command> --help`` and every
argument error answer in the time Python starts. What the parser must know of modules that
import torch (the models' options, the datasets, the likelihoods, the compare and sampler
defaults) it reads from :mod:`pvae.app._index`, a module generated from those sources (``python
-m pvae.app.index`` rewrites it; a test fails when it is stale). Where those modules are already
imported (a test, a notebook), the parser reads them instead, so that a model, an engine or a
dataset registered at run time is on the command line too. A command's own module (torch and
all) is imported only once its arguments have parsed (:attr:`Command.run`).

Every argument type raises ``argparse.ArgumentTypeError`` with a message argparse shows as it
is; every error becomes one line ``pvae: error: ...`` and exit status 2 (:class:`CliError`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import pvae
from pvae.app import _index
from pvae.app.registry import ENGINES, MODELS, ModelInfo, Option, bound_grammar, parse_bound

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


# ---------------------------------------------------------------------------------------------
# What the parser knows: the live modules where they are imported, else the generated index
# ---------------------------------------------------------------------------------------------


def _live(module: str) -> Any:
    """``module`` if it is imported already, else None."""
    return sys.modules.get(module)


def model_infos(sampled: bool | None = None) -> list[ModelInfo]:
    """The models (their :class:`~pvae.app.registry.ModelInfo`), in registration order;
    ``sampled``: only those that are (True) or are not (False) sampled."""
    infos = MODELS.entries() if MODELS.loaded else list(_index.MODELS)
    return [info for info in infos if sampled is None or info.sampled == sampled]


def _model_info(name: str) -> ModelInfo:
    return next(info for info in model_infos() if info.name == name)


def dataset_infos() -> list[tuple[str, str, str]]:
    """``(name, description, source)`` of every dataset of :mod:`pvae.data`."""
    data = _live("pvae.data")
    if data is None:
        return list(_index.DATASETS)
    return [(info.name, info.description, info.source) for info in data.available()]


def likelihood_names() -> list[str]:
    likelihoods = _live("pvae.likelihoods")
    return list(likelihoods.available() if likelihoods is not None else _index.LIKELIHOODS)


# ---------------------------------------------------------------------------------------------
# Argument types
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
    if value > _index.MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, {_index.MAX_SEED}] (numpy's limit), got {text!r}"
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


def _friction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _schedule_parts(text: str) -> tuple[str, int, float]:
    """``linear:STEPS`` -> ``("linear", STEPS, 0.5)``, ``cyclical:PERIOD[:RATIO]`` ->
    ``("cyclical", PERIOD, RATIO)``."""
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "linear" and len(parts) == 1 and int(parts[0]) >= 1:
            return kind, int(parts[0]), 0.5
        if kind == "cyclical" and len(parts) in (1, 2) and int(parts[0]) >= 1:
            ratio = float(parts[1]) if len(parts) == 2 else 0.5
            if 0.0 <= ratio <= 1.0:
                return kind, int(parts[0]), ratio
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected linear:STEPS or cyclical:PERIOD[:RATIO] (positive integers, 0 <= RATIO <= 1), "
        f"got {text!r}"
    )


def _beta_schedule(text: str) -> str:
    """``linear:STEPS`` or ``cyclical:PERIOD[:RATIO]`` (checked; kept as written)."""
    _schedule_parts(text)
    return text


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


def _model_name(sampled: bool) -> Callable[[str], str]:
    """``--model`` of ``pvae sample`` (``sampled``: the models with weights to sample) or of
    ``train``/``compare`` (the others)."""

    def parse(text: str) -> str:
        names = [info.name for info in model_infos()]
        name = text.strip().lower()
        if name not in names:
            raise argparse.ArgumentTypeError(
                f"unknown model {text!r}; valid choices: {', '.join(names)}"
            )
        if _model_info(name).sampled == sampled:
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
    return [info.name for info in model_infos(sampled)]


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


def _seeds(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}")
    seeds = [_seed(item) for item in items]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def parse_yardstick(text: str | None) -> tuple[str, int] | None:
    """``"iwae:64"`` -> ``("iwae", 64)``, ``"elbo:16"`` -> ``("elbo", 16)``; ``None`` or
    ``"none"`` -> None (no yardstick).

    :raises ValueError: for anything else, naming the expected form.
    """
    if text is None or text == "none":
        return None
    match = re.fullmatch(r"(iwae|elbo):([1-9][0-9]*)", str(text))
    if match is None:
        raise ValueError(
            f"yardstick must be iwae:K or elbo:K with K >= 1 (e.g. iwae:64), or none; got {text!r}"
        )
    return match.group(1), int(match.group(2))


def _yardstick(text: str) -> str:
    try:
        parse_yardstick(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def _loggers(text: str) -> list[str]:
    """``--log``: comma-separated logger names of :data:`pvae.tracking.LOGGERS`."""
    from pvae.tracking import LOGGERS  # no torch

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown logger {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(LOGGERS)} (several separated by commas)"
        )
    return list(dict.fromkeys(names))


def _dataset_name(text: str) -> str:
    names = [name for name, _, _ in dataset_infos()]
    key = text.strip().lower().replace("_", "-")  # as pvae.data.load matches names
    if key not in names:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; valid choices: {', '.join(names)}"
        )
    return key


def _likelihood_name(text: str) -> str:
    names = likelihood_names()
    if text not in names:
        raise argparse.ArgumentTypeError(
            f"unknown likelihood {text!r}; valid choices: {', '.join(names)}"
        )
    return text


def _option_type(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = option.name
    return parse


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``args.model`` given on the command line; an option of another model
    is refused."""
    given: dict[str, Any] = {}
    for info in model_infos():
        for option in info.options:
            value = getattr(args, info.dest(option), None)
            if value is None:
                continue
            if info.name != args.model:
                raise CliError(
                    f"{info.flag(option)} is an option of --model {info.name}, not {args.model}"
                )
            given[option.name] = value
    return given


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


# ---------------------------------------------------------------------------------------------
# Shared argument groups
# ---------------------------------------------------------------------------------------------


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
        choices=list(_index.BINARIZE),
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
    """``--model``, ``--z-dim``, ``--hidden``, ``--net``, ``--likelihood`` and every model's
    own options. A None default is resolved by the command (``quick``: the values it takes
    under ``--quick``). ``sampled``: the models of ``pvae sample``, else the trained ones."""
    group = parser.add_argument_group("model")
    names = _model_names(sampled)
    default = names[0] if sampled else "vae"
    group.add_argument(
        "--model",
        type=_model_name(sampled),
        default=default,
        metavar="NAME",
        help=f"one of: {', '.join(names)} (default: {default})",
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
        help=f"one of: {', '.join(likelihood_names())} (default: the dataset's, "
        "bernoulli for binarised images)",
    )
    for info in model_infos(sampled):
        if not info.options:
            continue
        options = parser.add_argument_group(f"options of --model {info.name}")
        for option in info.options:
            values = option.values
            options.add_argument(
                info.flag(option),
                dest=info.dest(option),
                type=_option_type(option),
                default=None,
                metavar="{" + ",".join(map(str, values)) + "}" if values else option.name.upper(),
                help=f"{option.help} (default: {option.default})",
            )


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
    engine_defaults = ", ".join(f"{e.name} {e.default_particles}" for e in ENGINES.entries())
    group.add_argument(
        "--particles",
        type=_positive_int,
        default=particles,
        help=f"{particles_help} "
        + (
            _default("particles", particles, None)
            if particles is not None
            else f"(default: the engine's: {engine_defaults}; MxK implies M*K)"
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
# The commands' arguments
# ---------------------------------------------------------------------------------------------


def _add_datasets_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


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
        help=f"one of: {', '.join(ENGINES.names())}, written as {bound_grammar()} (default: elbo)",
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


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    quick = _index.COMPARE_QUICK
    _add_data_arguments(parser, dataset="mnist5k")
    _add_model_arguments(parser, z_dim=None, hidden=None, quick=quick)
    group = parser.add_argument_group("bounds")
    group.add_argument(
        "--bounds",
        type=_bounds,
        default=list(_index.DEFAULT_BOUNDS),
        metavar="B1,B2,...",
        help=f"comma-separated bounds, each {bound_grammar()} "
        f"(default: {','.join(_index.DEFAULT_BOUNDS)})",
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
        quick=quick,
        particles_help="samples of z per datapoint and step, the same for every bound",
        resumable=False,
    )
    _add_compare_output_arguments(parser, quick)


def _add_compare_output_arguments(parser: argparse.ArgumentParser, quick: dict[str, Any]) -> None:
    """``pvae compare``'s diagnostics, run folder, seeds, devices and executors."""
    group = parser.add_argument_group("diagnostics and output")
    group.add_argument(
        "--snr-repeats",
        type=lambda text: _int(text, 2),
        default=None,
        metavar="N",
        help="gradients per bound for the gradient signal-to-noise ratio "
        + _default("snr_repeats", None, quick),
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
        "--quick",
        action="store_true",
        help=f"a smoke run in under a minute: {_index.QUICK_LIMITS['max_train']} training and "
        f"{_index.QUICK_LIMITS['max_eval']} valid/test points and the --quick defaults above",
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
        default=_index.YARDSTICK,
        metavar="iwae:K|elbo:K|none",
        help="the estimator every bound's model is evaluated with on "
        f"{_index.YARDSTICK_POINTS} validation points after every epoch, for learning curves "
        f"that compare like with like (default: {_index.YARDSTICK})",
    )
    _add_compare_executor_arguments(group)
    _add_log_argument(group, "one run per bound (steps, epochs, its results) and the results")


def _add_compare_executor_arguments(group: Any) -> None:
    """``pvae compare``'s device and where its cells run."""
    group.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda", "mps"],
        help="where the models train and are evaluated (default: cpu)",
    )
    group.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="cells (bound x seed) run in N processes at once (default: 1)",
    )
    group.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where the cells run: local processes, or Ray tasks on a Ray cluster "
        "(needs pip install 'pyro-vae[ray]') (default: local)",
    )


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


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    sghmc = _index.SAMPLER_DEFAULTS
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
        help=f"SGHMC learning rate per datapoint; the step is lr / N (default: SGHMC's, "
        f"{sghmc['lr']})",
    )
    group.add_argument(
        "--friction",
        type=_friction,
        default=None,
        help=f"SGHMC friction in (0, 1] (default: SGHMC's, {sghmc['friction']})",
    )
    group.add_argument(
        "--init-radius",
        type=_positive_float,
        default=None,
        help="chains start with unconstrained values uniform in (-R, R) (default: SGHMC's, "
        f"{sghmc['init_radius']}; 0.1 starts a network's weights small, as its "
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


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, its arguments and what it runs: ``run``,
    ``"module:function"``, imported once the arguments have parsed."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str

    def function(self) -> Callable[[argparse.Namespace], int]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: list[Command] = [
    Command(
        "compare",
        "train one model once per bound (same seed, data and particles) and compare them",
        _add_compare_arguments,
        "pvae.app.cli:_compare",
    ),
    Command(
        "diagnose",
        "diagnose a trained run: posterior collapse, latent relevance and traversals",
        _add_diagnose_arguments,
        "pvae.app.cli:_diagnose",
    ),
    Command(
        "train",
        "train one model with one engine and evaluate it",
        _add_train_arguments,
        "pvae.app.cli:_train",
    ),
    Command("datasets", "list the datasets", _add_datasets_arguments, f"{__name__}:_datasets"),
    Command(
        "sample",
        "sample a model's weights with SGHMC (e.g. --model bae) and save the posterior",
        _add_sample_arguments,
        "pvae.app.cli:_sample",
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed ``argv``, checked across arguments (an engine the model cannot take).

    :raises CliError: for any argument error; ``SystemExit`` for ``--help``/``--version``.
    """
    args = build_parser().parse_args(argv)
    _check_engines(args)
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

"""Run folders: the :class:`RunConfig` that every command writes into ``config.json``
(atomically) and ``pvae diagnose`` rebuilds the data and the model from (through the
registries); the checked :class:`RunFolder` every command writes into; and the measures every
command reports the same way (:func:`latent_activity`).

``config.json`` holds ``{"pvae_version", "command", "run": RunConfig, "args", "argv",
"data", "versions"}``: ``run`` is what rebuilds the run; ``args`` and ``argv`` record the
command line (``argv`` parses back to ``args``); ``data`` and ``versions`` are facts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule

import pvae
from pvae import checkpoint, data
from pvae.app.registry import MODELS, BoundSpec, parse_bound
from pvae.checkpoint import RUN_JSON
from pvae.data import rows, subset
from pvae.evaluate import num_items
from pvae.plots import write_json

__all__ = [
    "CONFIG",
    "RunConfig",
    "RunFolder",
    "RunFolderError",
    "bound_folder",
    "canonical_argv",
    "json_args",
    "read_config",
    "rows",
    "subset",
    "write_config",
    "write_json",
]

CONFIG = "config.json"
BINARIZE = {"dynamic": "dynamic", "static": "static", "none": None}
# ``--quick`` keeps the first points of each split: (max_train, max_eval), by kind of data.
QUICK_LIMITS = {"max_train": 500, "max_eval": 100}
QUICK_SEQUENCE_LIMITS = {"max_train": 32, "max_eval": 16}  # a sequence holds T frames


class RunFolderError(ValueError):
    """A run folder or its configuration cannot be read or rebuilt; the message says why."""


class ModelDataError(ValueError):
    """The model does not take the loaded data set (its registration's ``dataset_for``)."""


@dataclass
class RunConfig:
    """Everything that rebuilds a run's data and model (and what it trained with).

    Data: ``dataset``, ``seed`` (also the split's), ``binarize`` (None: the dataset's),
    ``data_path``, ``max_train``/``max_eval`` (the first points kept of each split; None: all).
    Model: ``model`` (a name of :data:`pvae.app.registry.MODELS`) with ``model_options``,
    ``z_dim``, ``hidden``, ``net``, ``likelihood`` (None: the dataset's). Training:
    ``engine`` (train) or ``bounds`` (compare), ``particles``, ``inner``, ``epochs``,
    ``batch_size``, ``lr``, ``ll_samples``, ``quick``.
    """

    command: str
    dataset: str
    seed: int = 0
    binarize: str | None = None
    data_path: str | None = None
    max_train: int | None = None
    max_eval: int | None = None
    model: str = "vae"
    model_options: dict[str, Any] = field(default_factory=dict)
    z_dim: int = 20
    hidden: tuple[int, ...] = (200, 200)
    net: str = "mlp"
    likelihood: str | None = None
    engine: str | None = None
    bounds: list[str] = field(default_factory=list)
    particles: int = 1
    inner: int | None = None
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    ll_samples: int = 1000
    quick: bool = False
    beta_schedule: str | None = None
    seeds: list[int] = field(default_factory=list)
    yardstick: str | None = None
    snr_repeats: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.hidden = tuple(int(width) for width in self.hidden)
        if not isinstance(self.model_options, dict):
            raise RunFolderError(f"model_options must be a mapping, got {self.model_options!r}")

    @classmethod
    def from_args(cls, command: str, args: Any) -> RunConfig:
        """The run of a parsed command line ``args`` (an ``argparse.Namespace`` whose budget
        knobs are resolved), the model's options given there resolved against its defaults.
        Arguments a command does not have keep the defaults; a comparison's data are split
        with its first seed; a sample run's engine is SGHMC."""
        card = MODELS[args.model]
        given = {option.name: getattr(args, card.dest(option), None) for option in card.options}
        names = {f.name for f in dataclasses.fields(cls)} - {"command", "model_options"}
        values = {key: getattr(args, key) for key in names if getattr(args, key, None) is not None}
        if command == "compare":
            values["engine"] = None
            values["seeds"] = list(getattr(args, "seeds", None) or [args.seed])
            values["seed"] = values["seeds"][0]
        if command == "sample":
            values["engine"] = "sghmc"
        return cls(command=command, model_options=card.resolve_options(given), **values)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> RunConfig:
        """The configuration that :meth:`to_json` wrote.

        :raises RunFolderError: a missing entry, one that is not a field, or options that are
            not a mapping.
        """
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise RunFolderError(f"unknown run configuration entries {unknown}")
        for required in ("command", "dataset"):
            if required not in values:
                raise RunFolderError(f"the run configuration lacks the entry {required!r}")
        return cls(**values)

    # -- rebuilding -------------------------------------------------------------------------
    def load_data(self) -> data.Splits:
        """The dataset as loaded (seeded), cut to ``max_train``/``max_eval``, as the model
        sees it (the registration's ``prepare``).

        :raises ValueError: (or TypeError/OSError/ImportError from the loader) when it cannot.
        """
        kwargs: dict[str, Any] = {"seed": self.seed}
        if self.binarize is not None:
            kwargs["binarize"] = BINARIZE.get(self.binarize, self.binarize)
        if self.data_path is not None:
            kwargs["path"] = self.data_path
        ds = data.load(self.dataset, **kwargs)
        if self.quick and self.max_train is None and self.max_eval is None:
            sequences = isinstance(ds, data.SequenceSplits)
            limits = QUICK_SEQUENCE_LIMITS if sequences else QUICK_LIMITS
            self.max_train, self.max_eval = limits["max_train"], limits["max_eval"]
        ds = subset(ds, self.max_train, self.max_eval)
        try:
            ds = MODELS[self.model].dataset_for(ds, self.model_options)
        except ValueError as error:
            raise ModelDataError(f"model {self.model!r}: {error}") from error
        if self.likelihood is None:
            self.likelihood = ds.likelihood
        return ds

    def build_model(self, ds: data.Splits) -> PyroModule:
        """The model of the prepared ``ds`` (fresh parameters).

        :raises ValueError: options or data the model does not take.
        """
        card = MODELS[self.model]
        return card.build(
            ds, self.z_dim, self.hidden, self.net, self.likelihood, self.model_options
        )

    def build_engine(self, bound: str | None = None) -> Any:
        """The engine of ``bound`` (default: the run's ``engine``), ``NAME[-stl|-dreg][:P]``,
        with ``particles`` samples per datapoint, and the run's ``beta_schedule``.

        :raises ValueError: an unknown bound, or a schedule on an engine without a KL weight.
        """
        name = bound if bound is not None else self.engine
        if name is None:
            raise ValueError("the run has no engine; pass the bound to build")
        engine = parse_bound(name).build(self.particles)
        if self.beta_schedule is not None:
            from pvae.inference import ELBO, CyclicalAnnealing, LinearAnnealing

            if not isinstance(engine, ELBO):
                raise ValueError(f"--beta-schedule anneals the ELBO; --engine is {name}")
            kind, *parts = self.beta_schedule.split(":")
            schedule = LinearAnnealing if kind == "linear" else CyclicalAnnealing
            engine.beta = schedule(int(parts[0]), *map(float, parts[1:]))
        return engine


class RunFolder(checkpoint.RunFolder):
    """A command's run folder, checked before any work and locked while the command writes
    (:class:`pvae.checkpoint.RunFolder`: ``with folder:`` creates it, holds its lock and, on
    leaving, removes the folders it created that are still empty).

    ``RunFolder(path)`` refuses (:class:`RunFolderError`) a path that exists and is not a
    folder, or that cannot be created or written to.
    """

    error = RunFolderError

    def __init__(self, path: str | os.PathLike[str], flag: str = "--run-dir") -> None:
        super().__init__(path, flag)
        existing = self.existing
        if not existing.is_dir():
            raise RunFolderError(f"cannot create {flag} {self.path}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "write into" if existing == self.path else f"create {self.path} in"
            raise RunFolderError(f"{flag} {self.path}: no permission to {what} {existing}")

    @property
    def command(self) -> str | None:
        """The command whose run the folder holds: its ``config.json``'s ``command``, else
        ``"sample"`` or ``"train"`` by its checkpoint (``run.json``'s ``kind``); None where
        it holds no pvae run."""
        command = recorded_command(self.path)
        if isinstance(command, str):
            return command
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads((self.path / RUN_JSON).read_text()).get("kind") == "sample":
                return "sample"
        return "train" if self.has_checkpoint else None


def bound_folder(spec: BoundSpec, seed: int | None = None) -> str:
    """The subfolder of a compare run that holds one bound's checkpoint: ``miwae_8x8``, or
    ``miwae_8x8/seed-1`` for one seed of a run with several (``seed`` given)."""
    folder = spec.label.replace(":", "_")
    return folder if seed is None else f"{folder}/seed-{seed}"


def write_config(
    run_dir: str | Path,
    config: RunConfig,
    ds: data.Splits,
    args: Mapping[str, Any] | None = None,
    argv: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """``config.json`` of ``run_dir`` (atomically); ``extra``: further top-level entries (JSON
    values, e.g. ``pvae sample``'s ``prior_selection``)."""
    image_shape = ds.image_shape
    return write_json(
        Path(run_dir) / CONFIG,
        {
            "pvae_version": pvae.__version__,
            "command": config.command,
            "run": config.to_json(),
            "args": dict(args) if args is not None else None,
            "argv": list(argv) if argv is not None else None,
            "data": {
                "name": ds.name,
                "x_dim": ds.x_dim,
                "image_shape": list(image_shape) if image_shape is not None else None,
                "num_train": num_items(ds.train),
                "num_valid": num_items(ds.valid),
                "num_test": num_items(ds.test),
            },
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "pyro": pyro.__version__,
            },
            **dict(extra or {}),
        },
    )


def json_args(args: Any) -> dict[str, Any]:
    """The parsed arguments ``args`` (an ``argparse.Namespace``) as JSON values (tuples become
    lists), without the dispatch entries: what ``config.json`` records as ``args``."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "func", "spelling")}
    return json.loads(json.dumps(values))


def canonical_argv(command: str, args: Any) -> list[str]:
    """A command line that parses back to ``args`` (every option spelled out), from the
    spelling the parser left in ``args.spelling``."""
    argv = [command]
    for dest, flag, switch in args.spelling:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)
        argv += [flag] if switch else [flag, str(value)]
    return argv


def read_config(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The :class:`RunConfig` of ``run_dir`` and the whole ``config.json``.

    :raises RunFolderError: unreadable, or not written by ``pvae train``/``pvae compare``.
    """
    path = Path(run_dir) / CONFIG
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunFolderError(f"cannot read {path}: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("run"), dict):
        raise RunFolderError(f"{path} is not the configuration of a pvae run (no 'run' entry)")
    try:
        return RunConfig.from_json(document["run"]), document
    except (TypeError, ValueError) as error:
        raise RunFolderError(f"{path}: {error}") from error


def recorded_command(run_dir: Path) -> Any:
    """The ``command`` that ``run_dir``'s ``config.json`` records; None without a readable one."""
    try:
        return json.loads((run_dir / CONFIG).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None

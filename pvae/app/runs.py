"""Run folders: one :class:`RunConfig`, written by ``pvae train`` and ``pvae compare`` into
``config.json`` (atomically) and read back by ``pvae diagnose``, which rebuilds the data and
the model from it through the registries; and the measures every command reports the same
way (:func:`latent_activity`).

``config.json`` holds ``{"pvae_version", "command", "run": RunConfig, "args", "argv",
"data", "versions"}``: ``run`` is what rebuilds the run; ``args`` and ``argv`` record the
command line (``argv`` parses back to ``args``); ``data`` and ``versions`` are facts.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule

import pvae
from pvae import data
from pvae.app.registry import MODELS
from pvae.diagnostics import ActiveUnits, active_units
from pvae.evaluate import as_tensors, num_items
from pvae.plots import write_json

__all__ = [
    "CONFIG",
    "RunConfig",
    "RunFolderError",
    "latent_activity",
    "latent_sites",
    "read_config",
    "subset",
    "write_config",
    "write_json",
]

CONFIG = "config.json"
BINARIZE = {"dynamic": "dynamic", "static": "static", "none": None}


class RunFolderError(ValueError):
    """A run folder or its configuration cannot be read or rebuilt; the message says why."""


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

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden"] = list(self.hidden)
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> RunConfig:
        """:raises RunFolderError: a missing entry or one that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunFolderError(f"unknown run configuration entries {unknown}")
        for required in ("command", "dataset"):
            if required not in values:
                raise RunFolderError(f"the run configuration lacks the entry {required!r}")
        config = cls(**values)
        config.hidden = tuple(int(width) for width in config.hidden)
        return config

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
        ds = subset(ds, self.max_train, self.max_eval)
        return MODELS[self.model].dataset_for(ds, self.model_options)

    def build_model(self, ds: data.Splits) -> PyroModule:
        """The model of the prepared ``ds`` (fresh parameters).

        :raises ValueError: options or data the model does not take.
        """
        entry = MODELS[self.model]
        return entry.build(
            ds, self.z_dim, self.hidden, self.net, self.likelihood, self.model_options
        )


def subset(ds: data.Splits, max_train: int | None, max_eval: int | None) -> data.Splits:
    """The first ``max_train`` training and ``max_eval`` valid/test points (the splits are
    already shuffled); tuples of modalities, sequence splits ``(values, times, mask)`` and
    their generating truth are cut row-wise."""

    def head(values: Any, limit: int | None) -> Any:
        if limit is None or values is None:
            return values
        if isinstance(values, data.SequenceSplit):  # (values, times, mask): rows cut
            return data.SequenceSplit(*(item[:limit] for item in values))
        if isinstance(values, tuple):
            return tuple(head(item, limit) for item in values)
        if isinstance(values, data.DynamicBinarized):
            return data.DynamicBinarized(values.probs[:limit])
        return values[:limit]

    extra: dict[str, Any] = {}
    if isinstance(ds, data.SequenceSplits):  # the generating truth has a row per sequence
        limits = {"train": max_train, "valid": max_eval, "test": max_eval}
        extra["truth"] = {
            split: {key: head(value, limits.get(split)) for key, value in truth.items()}
            for split, truth in ds.truth.items()
        }
    return dataclasses.replace(
        ds,
        **extra,
        train=head(ds.train, max_train),
        train_labels=head(ds.train_labels, max_train),
        valid=head(ds.valid, max_eval),
        valid_labels=head(ds.valid_labels, max_eval),
        test=head(ds.test, max_eval),
        test_labels=head(ds.test_labels, max_eval),
    )


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


# ---------------------------------------------------------------------------------------------
# Measures shared by the commands
# ---------------------------------------------------------------------------------------------


def latent_sites(model: PyroModule) -> tuple[str, ...]:
    """The model's per-datapoint latent layers: ``layer_sites`` where it has them, else
    ``("z",)``."""
    return tuple(getattr(model, "layer_sites", ("z",)))


def latent_activity(
    model: PyroModule,
    test: Any,
    seed: int,
    num_points: int | None = None,
    channels: Mapping[str, Any] | None = None,
) -> dict[str, ActiveUnits]:
    """Active units per latent layer (:func:`pvae.diagnostics.active_units`, threshold 0.01,
    Burda et al.) on the first ``num_points`` rows of ``test``, seeded with ``seed`` (the
    global random state is left as found).

    ``pvae compare`` (the "active units" column) and ``pvae diagnose`` (the "active" column
    and the summary) both call this, on the same test points, so they report one number: the
    sum of the counts over the layers. ``channels``: the model's dimension map (its
    registration's ``channels``): those sites are counted per channel.
    """
    rows = as_tensors(test)
    if num_points is not None:
        rows = tuple(t[:num_points] for t in rows)
    batch: Any = rows if len(rows) > 1 else rows[0]
    with torch.random.fork_rng(devices=[]):
        result = {}
        for site in latent_sites(model):
            torch.manual_seed(seed)
            result[site] = active_units(model.guide, batch, site=site, channels=channels)
    return result


def count_active(activity: Mapping[str, ActiveUnits]) -> tuple[int, int]:
    """``(active units, latent dimensions)`` summed over the layers."""
    return (
        sum(units.count for units in activity.values()),
        sum(units.dims for units in activity.values()),
    )

"""The registries through which ``pvae train``, ``pvae compare`` and ``pvae diagnose`` reach
every zoo model and every engine by name.

A **model** registration (:func:`register_model`) carries its factory, the kinds of dataset it
accepts (:data:`DATA_KINDS`), how it views a dataset (``prepare``: e.g. the CVAE's quadrant
task), its own command-line options (:class:`Option`, added to every command's parser as
``--<model>-<option>``), the callbacks it trains with (the ARD prior update) and the decoder
the diagnostics traverse. An **engine** registration (:func:`register_engine`) carries its
name, factory, the syntax of its ``:PARAMETER`` (:class:`Parameter`), a description and how many
particles it needs; the bound grammar, the parser, ``pvae compare``'s description of each
bound and the default particle budget all read it. Adding either is one call::

    register_engine("iwae", _iwae, "importance-weighted bound IWAE_K (Burda et al. 2016)",
                    describe=lambda spec, particles: f"IWAE_{particles}",
                    min_particles=2, default_particles=64)

Bounds are written ``NAME[-ESTIMATOR][:PARAMETER]`` (:func:`bound_grammar`,
:func:`parse_bound`), e.g. ``elbo``, ``iwae-dreg``, ``miwae:8x8``, ``ciwae:0.5``,
``piwae-stl:4x16``. ``elbo-stl`` (or ``-dreg``) is the P-sample ELBO as MIWAE(P, 1) with that
estimator (Monte-Carlo KL).

An unknown name raises :class:`UnknownName`, both a ``KeyError`` and a ``ValueError`` whose
message lists the valid choices (in registration order). This module sits above models and
engines in the dependency order: core modules never import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pyro
import torch
from pyro.nn import PyroModule

from pvae import data
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE, KalmanELBO
from pvae.metrics import imputation_error
from pvae.models import VAE

__all__ = [
    "DATA_KINDS",
    "ENGINES",
    "ESTIMATORS",
    "MODELS",
    "BoundSpec",
    "EngineEntry",
    "MetricsFn",
    "ModelEntry",
    "Option",
    "Parameter",
    "Registry",
    "UnknownName",
    "bound_grammar",
    "data_kind",
    "gp_imputation_metrics",
    "identification_metrics",
    "imputation_metrics",
    "parse_bound",
    "register_engine",
    "register_model",
    "split_particles",
]

Entry = TypeVar("Entry")


class UnknownName(KeyError, ValueError):
    """A name that is not in a registry; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, Entry], Generic[Entry]):
    """A read-only mapping ``name -> entry`` (each entry has a ``name``), filled by :meth:`add`.

    :param kind: what the names name ("model", "engine"), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> Entry:
        """Register ``entry`` under ``entry.name`` (lower case); returns it.

        :raises ValueError: if the name is already registered.
        """
        key = str(entry.name).strip().lower()  # type: ignore[attr-defined]
        if not key or key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is already registered or empty")
        self._entries[key] = entry
        return entry

    def remove(self, name: str) -> Entry:
        """Unregister ``name`` (tests register toys and take them away again)."""
        return self._entries.pop(self.normalise(name))

    def entries(self) -> list[Entry]:
        """Every entry, in registration order."""
        return list(self._entries.values())

    def names(self) -> list[str]:
        """The registered names, in registration order (for engines: the literature's)."""
        return list(self._entries)

    def normalise(self, name: str) -> str:
        """The registered spelling of ``name`` (case-insensitive).

        :raises UnknownName: (a ``ValueError``) naming the valid choices.
        """
        key = name.strip().lower() if isinstance(name, str) else name
        if key not in self._entries:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return key

    def __getitem__(self, name: str) -> Entry:
        return self._entries[self.normalise(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

DATA_KINDS = ("images", "vectors", "multimodal", "sequences", "multimodal-sequences")
"""``images``: :class:`pvae.data.Splits` with an ``image_shape``; ``vectors``: without one;
``multimodal``: :class:`pvae.data.MultimodalSplits` (tuples of modalities); ``sequences``:
:class:`pvae.data.SequenceSplits` (``(values, times, mask)`` per split);
``multimodal-sequences``: :class:`pvae.data.MultimodalSequenceSplits` (``(counts, frames,
times, modality_mask)`` per split)."""


def data_kind(ds: data.Splits) -> str:
    """The kind of ``ds``, one of :data:`DATA_KINDS`."""
    if isinstance(ds, data.SequenceSplits):
        return "sequences"
    if isinstance(ds, data.MultimodalSequenceSplits):
        return "multimodal-sequences"
    if isinstance(ds, data.MultimodalSplits) or isinstance(ds.train, tuple):
        return "multimodal"
    return "images" if ds.image_shape is not None else "vectors"


@dataclass(frozen=True)
class Option:
    """One option of a model: the factory's keyword ``name``, parsed from text by ``type``
    (which raises ValueError or ``argparse.ArgumentTypeError``), its ``default`` and a
    ``help`` line; ``choices`` restricts the values. On the command line it is
    ``--<model>-<name>`` (underscores become dashes)."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


MetricsFn = Callable[[PyroModule, data.Splits, str, int], dict[str, float]]
"""``metrics(model, ds, split, seed) -> {name: number}``: a model's own measures (seeded; the
global random state may be left changed: callers fork it)."""

ModelFactory = Callable[..., PyroModule]
"""``factory(ds, z_dim, hidden, net, likelihood, **options)``: a ``PyroModule`` with ``model``
and ``guide`` that fits the prepared dataset ``ds``; ``options`` are the model's own."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    :param factory: see :class:`ModelFactory`.
    :param accepts: the dataset kinds it trains on (:data:`DATA_KINDS`).
    :param options: its own options (:class:`Option`).
    :param prepare: ``prepare(ds, options) -> Splits``: the model's view of a loaded dataset
        (what ``model(*batch)`` receives); None: the dataset as loaded.
    :param callbacks: ``callbacks(model, ds) -> list``: extra ``pvae.fit`` callbacks.
    :param decoder: ``decoder(model) -> (z -> mean of the data)`` for the relevance score and
        the traversals of ``pvae diagnose``, or None when the model has no such decoder.
    :param metrics: ``metrics(model, ds, split, seed) -> {name: number}``: the model's own
        measures of a trained pair on a split (e.g. the imputation error of a sequence
        model), added to ``pvae compare``'s table and ``pvae train``'s metrics; None: none.
    :param channels: the dimension map of the diagnostics, ``{site: channel axes}`` (see
        :mod:`pvae.diagnostics.latents`), for latent sites with more than one event axis
        (e.g. ``{"z": -1}`` for a ``(T, C)`` state path): they are reported per channel.
    :param sampled: its global latent sites (weights with priors) are what a sampler draws:
        ``pvae sample`` takes it (and only such models: a VAE's per-datapoint latents under an
        untrained network are nothing to sample).
    """

    name: str
    factory: ModelFactory
    description: str
    accepts: tuple[str, ...] = ("images", "vectors")
    options: tuple[Option, ...] = ()
    prepare: Callable[[data.Splits, Mapping[str, Any]], data.Splits] | None = None
    callbacks: Callable[[PyroModule, data.Splits], list[Callable]] | None = None
    decoder: Callable[[PyroModule], Callable[[torch.Tensor], torch.Tensor] | None] = field(
        default=lambda model: getattr(model, "decode", None)
    )
    metrics: MetricsFn | None = None
    channels: Mapping[str, Any] | None = None
    sampled: bool = False

    def flag(self, option: Option) -> str:
        """``--<model>-<option>``."""
        return f"--{self.name}-{option.name.replace('_', '-')}"

    def dest(self, option: Option) -> str:
        """The attribute of the parsed arguments that holds ``option``."""
        return f"{self.name}_{option.name}".replace("-", "_")

    def resolve_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option, ``given`` values (not None) over the defaults.

        :raises ValueError: naming an option the model does not have, or a value not among
            the option's choices.
        """
        given = dict(given or {})
        known = {option.name: option for option in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no option {', '.join(unknown)}; its options: "
                f"{', '.join(known) or 'none'}"
            )
        resolved = {}
        for name, option in known.items():
            value = given.get(name)
            value = option.default if value is None else value
            if option.choices is not None and value not in option.choices:
                raise ValueError(
                    f"{self.flag(option)}: {value!r} is not one of "
                    f"{', '.join(map(str, option.choices))}"
                )
            resolved[name] = value
        return resolved

    def check_data(self, ds: data.Splits) -> None:
        """:raises ValueError: when the kind of ``ds`` is not one this model accepts."""
        kind = data_kind(ds)
        if kind not in self.accepts:
            several = " (it has several modalities)" if kind == "multimodal" else ""
            raise ValueError(
                f"dataset {ds.name!r} holds {kind}{several}; model {self.name!r} takes "
                f"{' or '.join(self.accepts)}"
            )

    def dataset_for(self, ds: data.Splits, options: Mapping[str, Any]) -> data.Splits:
        """The model's view of ``ds`` (checked against :attr:`accepts`, then prepared)."""
        self.check_data(ds)
        return self.prepare(ds, options) if self.prepare is not None else ds

    def build(
        self,
        ds: data.Splits,
        z_dim: int,
        hidden: Sequence[int],
        net: str,
        likelihood: str | None,
        options: Mapping[str, Any] | None = None,
    ) -> PyroModule:
        """The model for the *prepared* ``ds`` (likelihood None: the dataset's)."""
        return self.factory(
            ds,
            z_dim=z_dim,
            hidden=tuple(hidden),
            net=net,
            likelihood=likelihood or ds.likelihood,
            **self.resolve_options(options),
        )


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str,
    factory: ModelFactory,
    description: str,
    accepts: Sequence[str] = ("images", "vectors"),
    options: Sequence[Option] = (),
    prepare: Callable[[data.Splits, Mapping[str, Any]], data.Splits] | None = None,
    callbacks: Callable[[PyroModule, data.Splits], list[Callable]] | None = None,
    decoder: Callable[[PyroModule], Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
    metrics: MetricsFn | None = None,
    channels: Mapping[str, Any] | None = None,
    sampled: bool = False,
) -> ModelEntry:
    """Register a model (see :class:`ModelEntry`); returns its entry.

    :raises ValueError: a name already taken, an unknown data kind, or an option twice.
    """
    unknown = sorted(set(accepts) - set(DATA_KINDS))
    if unknown or not accepts:
        raise ValueError(f"accepts must name some of {', '.join(DATA_KINDS)}, got {accepts}")
    names = [option.name for option in options]
    if len(set(names)) != len(names):
        raise ValueError(f"model {name!r}: an option is declared twice in {names}")
    extra = {"decoder": decoder} if decoder is not None else {}
    entry = ModelEntry(
        name.strip().lower(),
        factory,
        description,
        tuple(accepts),
        tuple(options),
        prepare,
        callbacks,
        **extra,
        metrics=metrics,
        channels=dict(channels) if channels is not None else None,
        sampled=sampled,
    )
    return MODELS.add(entry)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        key = text.strip().lower()
        if key not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return key

    parse.__name__ = "choice"
    return parse


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"expected an integer >= {minimum}{upper}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def _number(minimum: float, maximum: float = math.inf, open_below: bool = False) -> Callable:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if open_below else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            bounds = f"{'>' if open_below else '>='} {minimum:g}"
            bounds += f" and <= {maximum:g}" if math.isfinite(maximum) else ""
            raise ValueError(f"expected a number {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _image_shape(ds: data.Splits, net: str) -> tuple[int, int, int] | None:
    if net != "conv":
        return None
    if ds.image_shape is None or len(ds.image_shape) != 3:
        raise ValueError(
            f"net 'conv' needs an image dataset; {ds.name!r} has no (channels, height, width) "
            "image_shape: use net 'mlp'"
        )
    channels, height, width = ds.image_shape
    return (channels, height, width)


def _mlp_only(model: str, net: str) -> None:
    if net != "mlp":
        raise ValueError(f"model {model!r} has MLP networks only: use --net mlp, not {net!r}")


def _vae(
    ds: data.Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str
) -> PyroModule:
    return VAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=_image_shape(ds, net),
    )


class QuadrantPairs(torch.utils.data.Dataset):
    """``(given, rest)`` pairs of image quadrants (:func:`pvae.data.quadrants`) of an image
    split, row by row, so that a dynamically binarised training set stays dynamic."""

    def __init__(self, images: Any, given_mask: torch.Tensor) -> None:
        self.images, self.given_mask = images, given_mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.images[index]
        return row[self.given_mask], row[~self.given_mask]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.images[list(indices)]
        return rows[:, self.given_mask], rows[:, ~self.given_mask]


def _quadrant_task(ds: data.Splits, options: Mapping[str, Any]) -> data.Splits:
    """x = the first ``given`` quadrants of each image, y = the rest (a conditional task)."""
    given = int(options["given"])
    mask = data.quadrants(torch.zeros(1, ds.x_dim), given, ds.image_shape).given_mask

    def split(values: Any) -> Any:
        if isinstance(values, torch.Tensor):
            task = data.quadrants(values, given, ds.image_shape)
            return (task.given, task.rest)
        return QuadrantPairs(values, mask)

    info = {**ds.info, "given_quadrants": given, "x_dim_given": int(mask.sum())}
    return dataclasses.replace(
        ds,
        train=split(ds.train),
        valid=split(ds.valid),
        test=split(ds.test),
        x_dim=int((~mask).sum()),
        image_shape=None,
        info=info,
    )


def _cvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    given: int = 1,
    objective: str = "cvae",
    alpha: float = 0.5,
    kl_weight: float = 1.0,
) -> PyroModule:
    from pvae.models.cvae import CVAE

    _mlp_only("cvae", net)
    given_dim = int(ds.info.get("x_dim_given", 0))
    if not given_dim:
        raise ValueError("model 'cvae' needs the quadrant task of an image dataset")
    return CVAE(
        x_dim=given_dim,
        y_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        objective=objective,
        alpha=alpha,
        kl_weight=kl_weight,
    )


def _hvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    layers: int = 2,
    inference: str = "bottom-up",
) -> PyroModule:
    from pvae.models.hierarchical import HierarchicalVAE

    _mlp_only("hvae", net)
    z_dims = tuple(max(1, z_dim // 2**layer) for layer in range(layers))
    return HierarchicalVAE(
        x_dim=ds.x_dim,
        z_dims=z_dims,
        hidden=tuple(tuple(hidden) for _ in range(layers)),
        likelihood=likelihood,
        inference=inference,
    )


def _multimodal(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    fusion: str = "poe",
) -> PyroModule:
    from pvae.models.multimodal import MultimodalVAE

    _mlp_only("multimodal", net)
    modalities = getattr(ds, "modalities", None)
    if not modalities:
        raise ValueError(f"dataset {ds.name!r} names no modalities")
    return MultimodalVAE(dict(modalities), z_dim=z_dim, fusion=fusion, hidden=tuple(hidden))


def _first_modality(model: PyroModule) -> Callable[[torch.Tensor], torch.Tensor]:
    first = model.names[0]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z)[first]

    return decode


def _ard(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    min_variance: float = 1e-6,
) -> PyroModule:
    from pvae.models.ard import ARDVAE

    _mlp_only("ard", net)
    return ARDVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        min_variance=min_variance,
    )


register_model("vae", _vae, "variational autoencoder, Gaussian latents (Kingma & Welling 2014)")
register_model(
    "cvae",
    _cvae,
    "conditional VAE p(y | x) on image quadrants: x the given ones, y the rest (Sohn et al. 2015)",
    accepts=("images",),
    options=(
        Option("given", _integer(1, 3), 1, "quadrants given as the input x (1, 2 or 3)"),
        Option(
            "objective",
            _choice(("cvae", "gsnn", "hybrid")),
            "cvae",
            "objective",
            ("cvae", "gsnn", "hybrid"),
        ),
        Option("alpha", _number(0.0, 1.0), 0.5, "weight of the CVAE part of the hybrid"),
        Option("kl_weight", _number(0.0, open_below=True), 1.0, "weight of the KL term"),
    ),
    prepare=_quadrant_task,
    decoder=lambda model: None,  # decode(x, z) needs the input x too
)
register_model(
    "hvae",
    _hvae,
    "hierarchical VAE, --z-dim halving per layer up (Sonderby et al. 2016)",
    options=(
        Option("layers", _integer(1), 2, "stochastic layers"),
        Option(
            "inference",
            _choice(("bottom-up", "ladder")),
            "bottom-up",
            "guide",
            ("bottom-up", "ladder"),
        ),
    ),
)


def _multimodal_metrics(
    model: PyroModule, ds: data.Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """Cross coherence (Shi et al. 2019) for every ordered pair of modalities, when the data
    set has labels (``<split>_labels``, or a one-hot ``label`` modality): the fraction of
    samples of the target modality, generated from the source alone, whose label is right. A
    one-hot label modality is read by its argmax; any other target by a small classifier
    trained on the train split (seeded)."""
    from pvae.evaluate import as_tensors
    from pvae.models.multimodal import coherence, train_classifier

    names = list(model.names)
    parts = {
        n: dict(zip(names, as_tensors(getattr(ds, s)), strict=True))
        for n, s in (("train", "train"), (split, split))
    }

    def labels_of(which: str):
        given = getattr(ds, f"{which}_labels", None)
        if given is not None:
            return torch.as_tensor(given).long()
        if "label" in names:
            return parts[which]["label"].argmax(-1)
        return None

    labels, train_labels = labels_of(split), labels_of("train")
    if labels is None or train_labels is None or len(names) < 2:
        return {}
    metrics: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for target in names:
            classifier = None
            if target != "label":
                classifier = train_classifier(parts["train"][target], train_labels, seed=seed)
            for source in names:
                if source != target:
                    given = {source: parts[split][source]}
                    value = coherence(model, given, target, labels, classifier)
                    metrics[f"coherence_{source}_to_{target}"] = value
    return metrics


register_model(
    "multimodal",
    _multimodal,
    "multimodal VAE over paired modalities, PoE/MoE/MoPoE posterior",
    accepts=("multimodal",),
    options=(Option("fusion", _choice(("poe", "moe", "mopoe")), "poe", "joint posterior", None),),
    decoder=_first_modality,
    metrics=_multimodal_metrics,
)
register_model(
    "ard",
    _ard,
    "VAE with an ARD prior re-estimated every epoch (Saha et al. 2025)",
    options=(
        Option("min_variance", _number(0.0, open_below=True), 1e-6, "floor of the prior variances"),
    ),
    callbacks=lambda model, ds: [model.prior_callback(ds.valid)],
)


def _clean_frames(ds: data.Splits, split: str) -> Any:
    return getattr(ds, "truth", {}).get(split, {}).get("frames")


def imputation_metrics(
    model: PyroModule, ds: data.Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """:func:`pvae.metrics.imputation_error` of a sequence model on a split of
    :class:`pvae.data.SequenceSplits` (against ``ds.truth[split]["frames"]`` where the set has
    them): ``imputation_mse``, ``imputation_mse_mean_frame``, ``held_out_frames``."""
    out = imputation_error(model, getattr(ds, split), _clean_frames(ds, split), seed)
    out.pop("held_out_entries", None)
    return out


def _svae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    drop_fraction: float = 0.0,
) -> PyroModule:
    from pvae.models.structured import StructuredVAE

    times = ds.train[1]  # the dynamics' time unit: the median gap between training frames
    gaps = times[:, 1:] - times[:, :-1] if times.shape[-1] > 1 else times.new_ones(1)
    return StructuredVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=_image_shape(ds, net),
        drop_fraction=drop_fraction,
        time_scale=float(gaps.median()),
    )


register_model(
    "svae",
    _svae,
    "structured VAE: linear dynamical prior, encoder potentials smoothed exactly "
    "(Johnson et al. 2016; Zhao & Linderman 2023)",
    accepts=("sequences",),
    options=(
        Option(
            "drop_fraction",
            _number(0.0, 1.0),
            0.0,
            "share of frames hidden from the encoder in random windows (self-supervised)",
        ),
    ),
    decoder=lambda model: None,  # its latent is a (T, D) path: no traversal of one z
    metrics=imputation_metrics,
    channels={"z": -1},
)


AUTO = "auto"
"""The value of ``--bae-prior-scale`` that chooses the scale from the data."""

PRIOR_SCALES = (0.1, 0.3, 1.0, 3.0)
"""The candidates of ``--bae-prior-scale auto``."""


def _scale_or_auto(text: str) -> float | str:
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        return _number(0.0, open_below=True)(text)
    except ValueError:
        raise ValueError(f"expected 'auto' or a number > 0, got {text!r}") from None


_scale_or_auto.__name__ = "scale"


def _bae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    prior_scale: float | str = AUTO,
    noise_scale: float = 0.1,
) -> PyroModule:
    """The BayesianAE; ``prior_scale="auto"``: the scale among :data:`PRIOR_SCALES` whose
    prior-predictive outputs on the training data are closest to them in the distributional
    sliced-Wasserstein distance (``BayesianAE.select_prior``, Tran et al. 2021), kept with
    its distances in the model's ``prior_selection`` attribute."""
    from pvae.evaluate import as_tensors
    from pvae.models import BayesianAE

    _mlp_only("bae", net)
    kw = {"scale": noise_scale} if likelihood == "gaussian" else {}
    auto = isinstance(prior_scale, str) and prior_scale.strip().lower() == AUTO
    model = BayesianAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        prior_scale=1.0 if auto else prior_scale,
        likelihood_kw=kw,
    )
    if auto:
        x = as_tensors(ds.train)[0].reshape(-1, ds.x_dim).to(torch.get_default_dtype())
        model.prior_selection = model.select_prior(x, scales=PRIOR_SCALES, metric="dswd")
    return model


register_model(
    "bae",
    _bae,
    "Bayesian autoencoder: priors on every weight, sampled with SGHMC by 'pvae sample' "
    "(Tran et al. 2021)",
    options=(
        Option(
            "prior_scale",
            _scale_or_auto,
            AUTO,
            "sd of the N(0, s^2) weight prior; 'auto': the one of "
            f"{', '.join(map(str, PRIOR_SCALES))} whose prior predictive is closest to the "
            "training data in distributional sliced Wasserstein (DSWD)",
        ),
        Option(
            "noise_scale",
            _number(0.0, open_below=True),
            0.1,
            "the fixed sd of a gaussian likelihood",
        ),
    ),
    decoder=lambda model: None,
    sampled=True,
)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

ESTIMATORS = ("reparam", "stl", "dreg")


def split_particles(
    name: str, particles: int, outer: int | None = None, inner: int | None = None
) -> tuple[int, int]:
    """``(M, K)`` with ``M * K == particles`` for miwae/piwae.

    Both given: they must multiply to ``particles``; ``inner`` alone: it must divide
    ``particles``; neither: M = K = sqrt(particles), which must then be a square.

    :raises ValueError: naming both numbers when they do not fit.
    """
    if outer is not None and inner is not None:
        if outer * inner != particles:
            raise ValueError(
                f"{name}:{outer}x{inner} has M*K = {outer * inner} but --particles is "
                f"{particles}: M*K must equal --particles"
            )
        return outer, inner
    if inner is not None:
        if inner < 1 or particles % inner:
            raise ValueError(
                f"M*K must equal --particles: {name} with K = {inner} (--inner) does not divide "
                f"--particles {particles}"
            )
        return particles // inner, inner
    root = math.isqrt(particles)
    if root * root != particles:
        raise ValueError(
            f"M*K must equal --particles: {name} splits --particles {particles} into M groups "
            f"of K, and {particles} is not a square; give the split as {name}:MxK or --inner K"
        )
    return root, root


@dataclass(frozen=True)
class Parameter:
    """The ``:PARAMETER`` of a bound.

    :param syntax: how it is written (``MxK``, ``BETA``); ``help``: what it means.
    :param parse: ``parse(text) -> values`` (a dict of the engine factory's keywords);
        raises ValueError saying what was expected.
    :param resolve: ``resolve(name, particles, values, inner) -> values``: the defaults filled
        in for a budget of ``particles`` (``inner``: ``--inner``); raises ValueError.
    :param format: ``format(values) -> text`` (what :attr:`parse` reads back).
    :param particles: ``particles(values) -> int | None``: the budget the values imply.
    """

    syntax: str
    help: str
    parse: Callable[[str], dict[str, Any]]
    resolve: Callable[[str, int, Mapping[str, Any], int | None], dict[str, Any]]
    format: Callable[[Mapping[str, Any]], str]
    particles: Callable[[Mapping[str, Any]], int | None] = lambda values: None


@dataclass(frozen=True)
class EngineEntry:
    """A registered engine: ``factory(particles, estimator=..., **values)`` returns a
    ``pyro.infer.ELBO``; ``describe(spec, particles)`` says in words what a resolved bound
    trains; ``min_particles``: fewer is refused (IWAE with one particle is the ELBO);
    ``default_particles``: the budget when none is given."""

    name: str
    factory: Callable[..., pyro.infer.ELBO]
    description: str
    describe: Callable[[BoundSpec, int], str]
    parameter: Parameter | None = None
    estimators: tuple[str, ...] = ESTIMATORS
    min_particles: int = 1
    default_particles: int = 1


ENGINES: Registry[EngineEntry] = Registry("engine")


def register_engine(
    name: str,
    factory: Callable[..., pyro.infer.ELBO],
    description: str,
    describe: Callable[[BoundSpec, int], str] | None = None,
    parameter: Parameter | None = None,
    estimators: Sequence[str] = ESTIMATORS,
    min_particles: int = 1,
    default_particles: int = 1,
) -> EngineEntry:
    """Register an engine (see :class:`EngineEntry`); returns its entry."""
    if min_particles < 1 or default_particles < min_particles:
        raise ValueError(
            f"engine {name!r}: need 1 <= min_particles <= default_particles, got "
            f"{min_particles}, {default_particles}"
        )
    if "reparam" not in estimators or set(estimators) - set(ESTIMATORS):
        raise ValueError(f"estimators must include 'reparam' and be among {ESTIMATORS}")
    key = name.strip().lower()
    return ENGINES.add(
        EngineEntry(
            key,
            factory,
            description,
            describe or (lambda spec, particles: f"{key.upper()}_{particles}"),
            parameter,
            tuple(estimators),
            min_particles,
            default_particles,
        )
    )


def bound_grammar() -> str:
    """The bound grammar, from the registered engines."""
    parameters = "; ".join(
        f"{entry.syntax_name} {entry.parameter.syntax} ({entry.parameter.help})"
        for entry in _parameter_engines()
    )
    return (
        f"NAME[-stl|-dreg][:PARAMETER]: NAME one of {', '.join(ENGINES.names())}; -stl/-dreg "
        f"the guide's gradient estimator; PARAMETER: {parameters or 'none'}; e.g. iwae-dreg, "
        "miwae:8x8, ciwae:0.5"
    )


@dataclass(frozen=True)
class _Named:
    syntax_name: str
    parameter: Parameter


def _parameter_engines() -> list[_Named]:
    """Engines with a parameter, those sharing one syntax grouped (``miwae/piwae MxK``)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in ENGINES.entries():
        if entry.parameter is not None:
            key = (entry.parameter.syntax, entry.parameter.help)
            groups.setdefault(key, []).append(entry.name)
    named = []
    for names in groups.values():
        parameter = ENGINES[names[0]].parameter
        assert parameter is not None
        named.append(_Named("/".join(names), parameter))
    return named


@dataclass(frozen=True)
class BoundSpec:
    """A parsed bound: engine ``name``, gradient ``estimator`` and its parameter ``values``
    (empty: the engine's defaults, settled by :meth:`resolve` once the budget is known)."""

    name: str
    estimator: str = "reparam"
    values: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        """The parameter values as a dict, e.g. ``{"outer": 8, "inner": 8}``."""
        return dict(self.values)

    @property
    def engine(self) -> EngineEntry:
        return ENGINES[self.name]

    @property
    def label(self) -> str:
        """The canonical spelling, e.g. ``miwae-dreg:8x8`` (parses back to this spec)."""
        text = self.name if self.estimator == "reparam" else f"{self.name}-{self.estimator}"
        parameter = self.engine.parameter
        if parameter is not None and self.values:
            text += f":{parameter.format(self.options)}"
        return text

    def __str__(self) -> str:
        return self.label

    def default_particles(self) -> int:
        """The particle budget when none is given: the one the parameter implies (``MxK``),
        else the engine's default."""
        parameter = self.engine.parameter
        implied = parameter.particles(self.options) if parameter is not None else None
        return implied if implied is not None else self.engine.default_particles

    def resolve(self, particles: int, inner: int | None = None) -> BoundSpec:
        """This spec with its parameter's defaults filled in for ``particles`` per datapoint
        (``inner``: ``--inner``).

        :raises ValueError: too few particles for the engine, or values that do not fit.
        """
        entry = self.engine
        if particles < entry.min_particles:
            raise ValueError(
                f"{self.name} needs --particles >= {entry.min_particles}, got {particles} "
                f"(with one particle it is the ELBO: use elbo, or more particles)"
            )
        if entry.parameter is None:
            return self
        values = entry.parameter.resolve(self.name, particles, self.options, inner)
        return replace_values(self, values)

    def build(self, particles: int, inner: int | None = None) -> pyro.infer.ELBO:
        """The engine, with ``particles`` samples of z per datapoint.

        :raises ValueError: as :meth:`resolve`.
        """
        spec = self.resolve(particles, inner)
        return self.engine.factory(particles, estimator=spec.estimator, **spec.options)

    def describe(self, particles: int) -> str:
        """What this (resolved) bound trains, in words, e.g. ``MIWAE(M=8, K=8), DREG``."""
        text = self.engine.describe(self, particles)
        return text if self.estimator == "reparam" else f"{text}, {self.estimator.upper()}"


def replace_values(spec: BoundSpec, values: Mapping[str, Any]) -> BoundSpec:
    return dataclasses.replace(spec, values=tuple(sorted(values.items())))


def parse_bound(text: str) -> BoundSpec:
    """Parse ``NAME[-ESTIMATOR][:PARAMETER]`` (see :func:`bound_grammar`).

    :raises ValueError: naming the valid choices.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty bound; valid choices: {', '.join(ENGINES.names())}")
    head, colon, parameter = text.strip().lower().partition(":")
    name, dash, estimator = head.partition("-")
    if name not in ENGINES:
        raise UnknownName(
            f"unknown bound {text!r}; valid choices: {', '.join(ENGINES.names())} "
            f"(grammar: {bound_grammar()})"
        )
    entry = ENGINES[name]
    if dash and estimator not in entry.estimators:
        others = [e for e in entry.estimators if e != "reparam"]
        raise ValueError(
            f"bound {text!r}: unknown estimator {estimator!r}; valid choices: "
            f"{', '.join(others) or 'none'} (the default is the reparameterised gradient)"
        )
    spec = BoundSpec(entry.name, estimator if dash else "reparam")
    if not colon:
        return spec
    if entry.parameter is None:
        takes = "; ".join(f"{n.syntax_name} {n.parameter.syntax}" for n in _parameter_engines())
        raise ValueError(
            f"bound {text!r}: {entry.name} takes no parameter (its K is --particles); "
            f"parameters: {takes}"
        )
    try:
        values = entry.parameter.parse(parameter)
    except ValueError as error:
        raise ValueError(f"bound {text!r}: {entry.name} takes {error}") from None
    return replace_values(spec, values)


# -- the engines of pvae.inference ------------------------------------------------------------


def _elbo(particles: int, estimator: str = "reparam") -> pyro.infer.ELBO:
    if estimator == "reparam":
        return ELBO(num_particles=particles)
    return MIWAE(particles, 1, estimator=estimator)  # the P-sample ELBO, Monte-Carlo KL


def _describe_elbo(spec: BoundSpec, particles: int) -> str:
    kl = " (Monte-Carlo KL)" if spec.estimator != "reparam" else ""
    return f"ELBO, {particles} samples averaged{kl}"


def _iwae(particles: int, estimator: str = "reparam") -> pyro.infer.ELBO:
    return IWAE(num_particles=particles, estimator=estimator)


def _parse_split(text: str) -> dict[str, Any]:
    outer, x, inner = text.partition("x")
    if x and outer.isdigit() and inner.isdigit() and int(outer) > 0 and int(inner) > 0:
        return {"outer": int(outer), "inner": int(inner)}
    raise ValueError("MxK with positive integers, e.g. 8x8")


def _resolve_split(
    name: str, particles: int, values: Mapping[str, Any], inner: int | None
) -> dict[str, Any]:
    given_inner = values.get("inner", inner)
    m, k = split_particles(name, particles, values.get("outer"), given_inner)
    return {"outer": m, "inner": k}


def _split_particles(values: Mapping[str, Any]) -> int | None:
    if values.get("outer") is not None and values.get("inner") is not None:
        return int(values["outer"]) * int(values["inner"])
    return None


GROUP_SPLIT = Parameter(
    "MxK",
    "M groups of K particles, M*K = --particles",
    _parse_split,
    _resolve_split,
    lambda values: f"{values['outer']}x{values['inner']}",
    _split_particles,
)


def _grouped(engine: Callable[..., pyro.infer.ELBO]) -> Callable[..., pyro.infer.ELBO]:
    def factory(particles: int, estimator: str = "reparam", outer: int = 1, inner: int = 1):
        return engine(outer, inner, estimator=estimator)

    return factory


def _describe_grouped(spec: BoundSpec, particles: int) -> str:
    values = spec.options
    return f"{spec.name.upper()}(M={values.get('outer')}, K={values.get('inner')})"


def _parse_beta(text: str) -> dict[str, Any]:
    try:
        beta = float(text)
    except ValueError:
        beta = math.nan
    if not 0.0 <= beta <= 1.0:
        raise ValueError("BETA in [0, 1], e.g. ciwae:0.5")
    return {"beta": beta}


BETA = Parameter(
    "BETA",
    "in [0, 1], the weight of the ELBO; default 0.5",
    _parse_beta,
    lambda name, particles, values, inner: {"beta": values.get("beta", 0.5)},
    lambda values: f"{values['beta']:g}",
)


def _ciwae(particles: int, estimator: str = "reparam", beta: float = 0.5) -> pyro.infer.ELBO:
    return CIWAE(num_particles=particles, beta=beta, estimator=estimator)


def _describe_ciwae(spec: BoundSpec, particles: int) -> str:
    return f"CIWAE_{particles}, beta={spec.options.get('beta', 0.5):g}"


register_engine(
    "elbo", _elbo, "evidence lower bound (Kingma & Welling 2014)", describe=_describe_elbo
)
register_engine(
    "iwae",
    _iwae,
    "importance-weighted bound IWAE_K (Burda et al. 2016)",
    min_particles=2,
    default_particles=64,
)
register_engine(
    "miwae",
    _grouped(MIWAE),
    "average of M IWAE_K bounds (Rainforth et al. 2018)",
    describe=_describe_grouped,
    parameter=GROUP_SPLIT,
    default_particles=64,
)
register_engine(
    "ciwae",
    _ciwae,
    "beta * ELBO + (1 - beta) * IWAE (Rainforth et al. 2018)",
    describe=_describe_ciwae,
    parameter=BETA,
    min_particles=2,
    default_particles=64,
)
register_engine(
    "piwae",
    _grouped(PIWAE),
    "model follows IWAE_MK, guide MIWAE(M, K) (Rainforth et al. 2018)",
    describe=_describe_grouped,
    parameter=GROUP_SPLIT,
    default_particles=64,
)
register_engine(
    "kalman",
    lambda particles, estimator="reparam": KalmanELBO(num_particles=particles),
    "ELBO with the exact Kalman KL and linear-Gaussian expectations (state-space pairs)",
    describe=lambda spec, particles: f"KalmanELBO, {particles} smoothed draws",
    estimators=("reparam",),
)


def gp_imputation_metrics(
    model: PyroModule, ds: data.Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """:func:`pvae.metrics.imputation_error` of a GP-VAE on a split of
    :class:`pvae.data.SequenceSplits` or of its entry-masked view
    (:class:`pvae.data.gp_sets.EntryMaskedSplits`: the per-entry mask is passed on):
    ``imputation_mse``, ``imputation_mse_mean_frame``, ``held_out_entries``."""
    out = imputation_error(model, getattr(ds, split), _clean_frames(ds, split), seed)
    out.pop("held_out_frames", None)
    return out


def _entry_masked_view(ds: data.Splits, options: Mapping[str, Any]) -> data.Splits:
    """A set with a per-entry mask (``hmnist-like``) as 4-tuple splits ``(values, times,
    mask, observed)``, so that the GP-VAE scores observed entries only; other sequence sets
    as they are."""
    from pvae.data import gp_sets

    truth = getattr(ds, "truth", {})
    has_mask = all("observed" in truth.get(split, {}) for split in ("train", "valid", "test"))
    if isinstance(ds, data.SequenceSplits) and has_mask:
        return gp_sets.entry_masked(ds)
    return ds


def _gpvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    kernel: str = "cauchy",
    length_scale: float = 2.0,
    learn_kernel: str = "no",
) -> PyroModule:
    from pvae.models.gp_vae import GPVAE

    return GPVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        kernel=kernel,
        length_scale=length_scale,
        learn_kernel=learn_kernel == "yes",
    )


register_model(
    "gpvae",
    _gpvae,
    "GP-VAE: a dense GP prior over time per latent channel, banded-precision guide "
    "(Fortuin et al. 2020)",
    accepts=("sequences",),
    options=(
        Option(
            "kernel",
            _choice(("cauchy", "rbf", "matern12", "matern32", "matern52")),
            "cauchy",
            "the GP kernel over time",
        ),
        Option("length_scale", _number(0.0, open_below=True), 2.0, "the kernel's length scale"),
        Option("learn_kernel", _choice(("no", "yes")), "no", "learn the kernel's hyper-parameters"),
    ),
    prepare=_entry_masked_view,
    decoder=lambda model: None,  # its latent is an (L, T) path: no traversal of one z
    metrics=gp_imputation_metrics,
    channels={"z": -2},  # event (L, T): channels first
)


# ---------------------------------------------------------------------------------------------
# Markovian GP-VAE (Zhu et al. 2023)
# ---------------------------------------------------------------------------------------------


def _mgpvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    nu: float = 1.5,
    lengthscale: float = 1.0,
) -> PyroModule:
    from pvae.models.markovian_gp import MarkovianGPVAE

    return MarkovianGPVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        nu=nu,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=_image_shape(ds, net),
        lengthscale=lengthscale,
    )


register_model(
    "mgpvae",
    _mgpvae,
    "Markovian GP-VAE: Matérn GP prior per latent channel as an SDE on the (irregular) time "
    "stamps, encoder potentials smoothed exactly in O(T) (Zhu et al. 2023)",
    accepts=("sequences",),
    options=(
        Option("nu", float, 1.5, "Matérn smoothness", choices=(0.5, 1.5, 2.5)),
        Option("lengthscale", _number(0.0, open_below=True), 1.0, "initial GP lengthscale"),
    ),
    decoder=lambda model: None,  # its latent is a (T, d L) state path: no traversal of one z
    metrics=gp_imputation_metrics,
    channels={"z": -1},  # the L GP values, then their derivatives
)


# ---------------------------------------------------------------------------------------------
# MM-GPVAE (Gondur et al. 2024)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def identification_metrics(
    model: PyroModule, ds: data.Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """How well a trained MM-GPVAE identifies the true latent groups of a
    :class:`pvae.data.MultimodalSequenceSplits` split (:func:`pvae.diagnostics.
    identification_r2`, held-out trials): ``r2_<group>`` the R^2 of the true group from the
    inferred one of the same name (``shared``, ``neural``, ``image``, those the model has), and
    ``r2_cross_max`` the largest R^2 between different groups (low when the groups are
    disentangled). Empty when the split has no truth or fewer than 4 trials. Deterministic
    (``seed`` unused)."""
    from pvae.diagnostics import identification_r2

    parts = tuple(getattr(ds, split))
    trials = int(parts[0].shape[0])
    truth = getattr(ds, "truth", {}).get(split, {})
    groups = [g for g in ("shared", "neural", "image") if g in truth and model.dims[g] > 0]
    if not groups or trials < 4:
        return {}
    was_training = model.training
    model.eval()
    try:
        inferred = model.latents(*parts)
    finally:
        model.train(was_training)
    result = identification_r2(
        {g: inferred[g] for g in groups}, {g: truth[g][:trials] for g in groups}
    )  # a subset keeps the first trials: cut the truth alike
    out = {f"r2_{g}": float(result.diagonal[g]) for g in groups}
    out["r2_cross_max"] = float(result.off_diagonal_max())
    return out


def _mmgpvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    private_dim: int = 1,
    lengthscale: float = 5.0,
    analytic_poisson: str = "no",
) -> PyroModule:
    from pvae.models.multimodal_gp import MultimodalGPVAE

    _mlp_only("mmgpvae", net)
    if ds.image_shape is None:
        raise ValueError(f"model 'mmgpvae' needs image frames; {ds.name!r} has no image_shape")
    return MultimodalGPVAE(
        int(getattr(ds, "num_neurons", 0)),
        image_shape=tuple(ds.image_shape),
        shared_dim=z_dim,
        neural_dim=private_dim,
        image_dim=private_dim,
        hidden=tuple(hidden),
        prior="fourier",
        lengthscale=lengthscale,
        image_likelihood=likelihood,
        analytic_poisson=analytic_poisson == "yes",
    )


register_model(
    "mmgpvae",
    _mmgpvae,
    "MM-GPVAE: shared (--z-dim channels) and modality-private GP latents over time behind "
    "Poisson spike counts and images, Fourier-domain RBF prior (Gondur et al. 2024)",
    accepts=("multimodal-sequences",),
    options=(
        Option("private_dim", _integer(0), 1, "latent channels private to each modality"),
        Option("lengthscale", _number(0.0, open_below=True), 5.0, "initial GP lengthscale"),
        Option(
            "analytic_poisson",
            _choice(("no", "yes")),
            "no",
            "closed-form expected Poisson log-likelihood in the ELBO (IWAE and log p(x) keep the "
            "Poisson density)",
        ),
    ),
    decoder=lambda model: None,  # its latent is a set of paths: no traversal of one z
    metrics=identification_metrics,
    channels={"z": -2},  # Fourier coefficients (channels, frequencies): channels first
)


# ---------------------------------------------------------------------------------------------
# Koopman VAE (sequences)
# ---------------------------------------------------------------------------------------------


def _kvae(
    ds: data.Splits,
    z_dim: int,
    hidden: Sequence[int],
    net: str,
    likelihood: str,
    predictive_weight: float = 1.0,
    horizon: int = 1,
    constraint: str = "none",
) -> PyroModule:
    from pvae.models.koopman import KoopmanVAE

    _mlp_only("kvae", net)
    return KoopmanVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=int(hidden[0]) if hidden else 32,
        likelihood=likelihood,
        predictive_weight=predictive_weight,
        horizon=horizon,
        constraint=None if constraint == "none" else constraint,
    )


def _kvae_metrics(
    model: PyroModule, ds: data.Splits, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """The Koopman VAE's generation scores (discriminative: mean and sd over 5 post-hoc
    classifiers; predictive) on ``split``."""
    from pvae.models.koopman import generation_metrics

    return generation_metrics(model, ds, split, seed=seed)


register_model(
    "kvae",
    _kvae,
    "Koopman VAE: sequential GRU prior linearised by a least-squares Koopman operator "
    "(Naiman et al. 2024); generation metrics: pvae.models.koopman.generation_metrics",
    accepts=("sequences",),
    options=(
        Option("predictive_weight", _number(0.0), 1.0, "weight of the Koopman predictive loss"),
        Option("horizon", _integer(1), 1, "steps the Koopman operator is rolled forward"),
        Option(
            "constraint",
            _choice(("none", "stable", "unit")),
            "none",
            "penalty on the Koopman eigenvalues",
            ("none", "stable", "unit"),
        ),
    ),
    metrics=_kvae_metrics,
    channels={"z": -1},
    decoder=lambda model: None,
)

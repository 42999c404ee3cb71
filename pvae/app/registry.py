"""The registries through which the ``pvae`` commands reach every zoo model and every engine
by name: the mechanism only. Importing this module imports neither torch nor Pyro.

A **model** declares itself in its own file with a :class:`ModelCard` named ``CARD``: its
factory, the kinds of dataset it accepts (:data:`DATA_KINDS`), how it views a dataset, its
command-line options (:class:`Option`, derived from the constructor by :meth:`Option.of`, so
that defaults are never copied), metrics, callbacks, decoder and capabilities
(:data:`CAPABILITIES`). Adding a family is its card plus one name in :data:`MODEL_MODULES`;
:data:`MODELS` imports those files on first use (the command line reads
:mod:`pvae.app._index`, generated from the cards, instead).

An **engine** (:func:`register_engine`) declares its factory, the syntax of its ``:PARAMETER``
(:class:`Parameter`), the particles it needs and the capability it requires of a model; the
bound grammar, the parser and ``pvae compare``'s descriptions read it. Bounds are written
``NAME[-ESTIMATOR][:PARAMETER]`` (:func:`bound_grammar`, :func:`parse_bound`): ``elbo``,
``iwae-dreg``, ``miwae:8x8``, ``ciwae:0.5``; ``elbo-stl`` (or ``-dreg``) is the P-sample ELBO
as MIWAE(P, 1) with that estimator (Monte-Carlo KL).

An unknown name raises :class:`UnknownName` (a ``KeyError`` and a ``ValueError``) listing the
valid choices in registration order. Core modules never import this module.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import pyro
    import torch
    from pyro.nn import PyroModule

    from pvae import data

__all__ = [
    "CAPABILITIES",
    "DATA_KINDS",
    "ENGINES",
    "ESTIMATORS",
    "MODELS",
    "MODEL_MODULES",
    "BoundSpec",
    "Choice",
    "EngineEntry",
    "Integer",
    "MetricsFn",
    "ModelCard",
    "ModelInfo",
    "Option",
    "Parameter",
    "Real",
    "RealOrAuto",
    "Registry",
    "UnknownName",
    "bound_grammar",
    "data_kind",
    "parse_bound",
    "parse_yardstick",
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
    """A read-only mapping ``name -> entry`` (each entry has a ``name``; look-ups ignore case),
    filled by :meth:`add`.

    :param kind: what the names name ("model", "engine"), used in error messages.
    :param load: ``load(registry)``, run once before the first look-up: it registers the
        built-in entries (importing their modules only then).
    """

    def __init__(self, kind: str, load: Callable[[Registry[Entry]], None] | None = None) -> None:
        self.kind = kind
        self._load = load
        self._found: dict[str, Entry] = {}

    @property
    def loaded(self) -> bool:
        """Whether the built-in entries are registered (their modules imported)."""
        return self._load is None

    @property
    def _entries(self) -> dict[str, Entry]:
        if self._load is not None:
            load, self._load = self._load, None
            try:
                load(self)
            except BaseException:
                self._found.clear()
                self._load = load
                raise
        return self._found

    def add(self, entry: Entry) -> Entry:
        """Register ``entry`` under ``entry.name`` (lower case); returns it.

        :raises ValueError: if the name is already registered or empty.
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
        """The registered spelling of ``name``.

        :raises UnknownName: naming the valid choices.
        """
        key = name.strip().lower() if isinstance(name, str) else None
        if key not in self._entries:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return key

    def __getitem__(self, name: str) -> Entry:
        return self._entries[self.normalise(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------------
# Option types: text -> value, raising ValueError; their repr is the Python that rebuilds them
# (the generated index of the command line stores them so)
# ---------------------------------------------------------------------------------------------


def _in_range(
    value: float, minimum: float | None, maximum: float | None, open_below: bool = False
) -> bool:
    below = minimum is None or (value > minimum if open_below else value >= minimum)
    return math.isfinite(value) and below and (maximum is None or value <= maximum)


def _range_text(minimum: float | None, maximum: float | None, open_below: bool = False) -> str:
    parts = [f"{'>' if open_below else '>='} {minimum:g}"] if minimum is not None else []
    return " and ".join(parts + ([f"<= {maximum:g}"] if maximum is not None else []))


@dataclass(frozen=True)
class Integer:
    """An integer ``>= minimum`` (and ``<= maximum``)."""

    minimum: int = 0
    maximum: int | None = None

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = self.minimum - 1
        if not _in_range(value, self.minimum, self.maximum):
            expected = _range_text(self.minimum, self.maximum)
            raise ValueError(f"expected an integer {expected}, got {text!r}")
        return value


@dataclass(frozen=True)
class Real:
    """A finite number ``>= minimum`` (``> minimum`` when ``open_below``), ``<= maximum``."""

    minimum: float | None = None
    maximum: float | None = None
    open_below: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not _in_range(value, self.minimum, self.maximum, self.open_below):
            expected = _range_text(self.minimum, self.maximum, self.open_below)
            raise ValueError(f"expected a number {expected}".rstrip() + f", got {text!r}")
        return value


@dataclass(frozen=True)
class RealOrAuto:
    """The word ``auto`` or a number ``> 0``."""

    def __call__(self, text: str) -> float | str:
        if str(text).strip().lower() == "auto":
            return "auto"
        try:
            return Real(0.0, open_below=True)(text)
        except ValueError:
            raise ValueError(f"expected 'auto' or a number > 0, got {text!r}") from None


@dataclass(frozen=True)
class Choice:
    """One of ``choices`` (case-insensitive)."""

    choices: tuple[str, ...]

    def __call__(self, text: str) -> str:
        key = str(text).strip().lower()
        if key not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {text!r}")
        return key


def _param_help(owner: Callable[..., Any], name: str) -> str:
    """The first sentence of ``:param name:`` in the docstring of ``owner`` (or its
    ``__init__``), continuation lines joined."""
    docs = [inspect.getdoc(owner) or ""]
    if inspect.isclass(owner):
        docs.append(inspect.getdoc(owner.__init__) or "")
    for doc in docs:
        match = re.search(
            rf":param (?:[\w, ]*\b)?{name}\b[\w, ]*:(.*?)(?=\n\s*:|\n\s*\n|\Z)", doc, re.S
        )
        if match:
            text = " ".join(match.group(1).replace("``", "").split())
            return re.split(r"(?<=[a-z0-9)\]])\.(?: |$)", text, maxsplit=1)[0].strip()
    raise ValueError(f"{owner.__qualname__} documents no parameter {name!r}")


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

    @classmethod
    def of(
        cls,
        owner: Callable[..., Any],
        parameter: str,
        type: Callable[[str], Any] | None = None,
        name: str | None = None,
        help: str | None = None,
        choices: tuple[Any, ...] | None = None,
    ) -> Option:
        """The option for ``owner``'s keyword ``parameter``: its default from the signature
        (a bool as ``no``/``yes``, None as ``none``), its help from the docstring's
        ``:param parameter:`` unless given; ``type`` defaults to ``no``/``yes`` for a bool.

        :raises ValueError: when ``owner`` has no such keyword with a default.
        """
        found = inspect.signature(owner).parameters.get(parameter)
        if found is None or found.default is inspect.Parameter.empty:
            raise ValueError(f"{owner.__qualname__} has no keyword {parameter!r} with a default")
        default = found.default
        if type is None and not isinstance(default, bool):
            raise ValueError(f"option {parameter!r} of {owner.__qualname__} needs a type")
        if isinstance(default, bool) or default is None:
            default = {True: "yes", False: "no", None: "none"}[default]
        text = help if help is not None else _param_help(owner, parameter)
        return cls(name or parameter, type or Choice(("no", "yes")), default, text, choices)

    @property
    def values(self) -> tuple[Any, ...] | None:
        """The admissible values, when they are a list (``choices`` or a :class:`Choice`)."""
        if self.choices is not None:
            return self.choices
        return self.type.choices if isinstance(self.type, Choice) else None

    def parse(self, text: str) -> Any:
        """``type(text)``, checked against ``choices``.

        :raises ValueError: saying what was expected.
        """
        value = self.type(text)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(str, self.choices))}, got {text!r}")
        return value


# -- Models --------------------------------------------------------------------------------

DATA_KINDS = ("images", "vectors", "multimodal", "sequences", "multimodal-sequences")
"""``images``: :class:`pvae.data.Splits` with an ``image_shape``; ``vectors``: without one;
``multimodal``: :class:`pvae.data.MultimodalSplits` (tuples of modalities); ``sequences``:
:class:`pvae.data.SequenceSplits` (``(values, times, mask)`` per split);
``multimodal-sequences``: :class:`pvae.data.MultimodalSequenceSplits` (``(counts, frames,
times, modality_mask)`` per split)."""

CAPABILITIES = ("impute", "forecast", "sample", "per-channel", "state-space")
"""What a model can do beyond ``model``/``guide``: ``impute`` missing frames, ``forecast``
future ones, ``sample`` new data, ``per-channel`` diagnostics (a latent with several event
axes, see :attr:`ModelCard.channels`), ``state-space``: its guide's latent is a Kalman-smoothed
posterior (what the ``kalman`` engine needs)."""


def data_kind(ds: data.Splits) -> str:
    """The kind of ``ds``, one of :data:`DATA_KINDS`."""
    from pvae import data

    if isinstance(ds, data.SequenceSplits):
        return "sequences"
    if isinstance(ds, data.MultimodalSequenceSplits):
        return "multimodal-sequences"
    if isinstance(ds, data.MultimodalSplits) or isinstance(ds.train, tuple):
        return "multimodal"
    return "images" if ds.image_shape is not None else "vectors"


MetricsFn = Callable[[Any, "data.Splits", str, int], dict[str, float]]
"""``metrics(model, ds, split, seed) -> {name: number}``: a model's own measures (seeded; the
global random state may be left changed: callers fork it)."""

ModelFactory = Callable[..., "PyroModule"]
"""``factory(ds, z_dim, hidden, net, likelihood, **options)``: a ``PyroModule`` with ``model``
and ``guide`` that fits the prepared dataset ``ds``; ``options`` are the model's own, every
one given (defaults resolved)."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the command line knows of a model without importing it (its :class:`ModelCard`
    less the code): ``name``, one line of ``description``, the data kinds it ``accepts``, its
    ``options``, its ``capabilities`` (:data:`CAPABILITIES`) and whether it is ``sampled`` (its
    weights, with priors, are what ``pvae sample`` draws; such models are not trained)."""

    name: str
    description: str
    accepts: tuple[str, ...] = ("images", "vectors")
    options: tuple[Option, ...] = ()
    capabilities: tuple[str, ...] = ()
    sampled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip().lower())
        for what, given, known in (
            ("accepts", self.accepts, DATA_KINDS),
            ("capabilities", self.capabilities, CAPABILITIES),
        ):
            if (what == "accepts" and not given) or set(given) - set(known):
                raise ValueError(f"{what} must name some of {', '.join(known)}, got {given}")
        names = [option.name for option in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name!r}: an option is declared twice in {names}")

    def flag(self, option: Option) -> str:
        """``--<model>-<option>``."""
        return f"--{self.name}-{option.name.replace('_', '-')}"

    def dest(self, option: Option) -> str:
        """The attribute of the parsed arguments that holds ``option``."""
        return f"{self.name}_{option.name}".replace("-", "_")

    def info(self) -> ModelInfo:
        """This model's :class:`ModelInfo` (what the generated index stores)."""
        names = [f.name for f in dataclasses.fields(ModelInfo)]
        return ModelInfo(**{name: getattr(self, name) for name in names})

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
            resolved[name] = option.default if given.get(name) is None else given[name]
            if option.choices is not None and resolved[name] not in option.choices:
                raise ValueError(
                    f"{self.flag(option)}: {resolved[name]!r} is not one of "
                    f"{', '.join(map(str, option.choices))}"
                )
        return resolved


def _decode_method(model: PyroModule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return getattr(model, "decode", None)


@dataclass(frozen=True, kw_only=True)
class ModelCard(ModelInfo):
    """A model's declaration of itself (a :class:`ModelInfo` and its code).

    :param factory: see :data:`ModelFactory`.
    :param prepare: ``prepare(ds, options) -> Splits``: the model's view of a loaded dataset
        (what ``model(*batch)`` receives); None: the dataset as loaded.
    :param callbacks: ``callbacks(model, ds) -> list``: extra ``pvae.fit`` callbacks.
    :param decoder: ``decoder(model) -> (z -> mean of the data)`` for the relevance score and
        the traversals of ``pvae diagnose``, or None when the model has no such decoder
        (default: its ``decode`` method, if any).
    :param metrics: ``metrics(model, ds, split, seed) -> {name: number}``: the model's own
        measures of a trained pair on a split (e.g. the imputation error of a sequence
        model), added to ``pvae compare``'s table and ``pvae train``'s metrics; None: none.
    :param channels: the dimension map of the diagnostics, ``{site: channel axes}`` (see
        :mod:`pvae.diagnostics.latents`), for latent sites with more than one event axis
        (e.g. ``{"z": -1}`` for a ``(T, C)`` state path): they are reported per channel.
    """

    factory: ModelFactory
    prepare: Callable[[data.Splits, Mapping[str, Any]], data.Splits] | None = None
    callbacks: Callable[[PyroModule, data.Splits], list[Callable]] | None = None
    decoder: Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None] = field(
        default=_decode_method
    )
    metrics: MetricsFn | None = None
    channels: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels is not None:
            object.__setattr__(self, "channels", dict(self.channels))
        if (self.channels is not None) != ("per-channel" in self.capabilities):
            raise ValueError(f"model {self.name!r}: 'per-channel' goes with channels")

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


MODEL_MODULES = (
    "vae",
    "cvae",
    "hierarchical",
    "multimodal",
    "ard",
    "structured",
    "bayesian_ae",
    "gp_vae",
    "markovian_gp",
    "multimodal_gp",
    "koopman",
)
"""The files of :mod:`pvae.models` whose ``CARD`` :data:`MODELS` registers, in this order
(the order of ``--help`` and of the contract suite): one line per family."""


def _load_models(registry: Registry[ModelCard]) -> None:
    for module in MODEL_MODULES:
        registry.add(importlib.import_module(f"pvae.models.{module}").CARD)


MODELS: Registry[ModelCard] = Registry("model", load=_load_models)


def register_model(
    name: str, factory: ModelFactory, description: str, **declared: Any
) -> ModelCard:
    """Register a model given by its parts (the fields of :class:`ModelCard`); returns its card.

    :raises ValueError: a name already taken, an unknown data kind, or an option twice.
    """
    for key in ("accepts", "options", "capabilities"):
        if key in declared:
            declared[key] = tuple(declared[key])
    card = ModelCard(name=name, factory=factory, description=description, **declared)
    return MODELS.add(card)


def __getattr__(name: str) -> Any:
    if name in ("conv_image_shape", "require_mlp"):  # the model cards' net checks
        return getattr(importlib.import_module("pvae.nets"), name)
    if name == "PRIOR_SCALES":  # a former name of this module, now beside its model
        return importlib.import_module("pvae.models.bayesian_ae").PRIOR_SCALES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- Engines -------------------------------------------------------------------------------

ESTIMATORS = ("reparam", "stl", "dreg")
"""The gradient estimators of the guide (those of :mod:`pvae.inference.importance`, spelt out
here so that parsing a bound imports no torch; a test checks they agree)."""


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
    trains (default ``NAME_P``); ``min_particles``: fewer is refused (IWAE with one particle
    is the ELBO); ``default_particles``: the budget when none is given; ``requires``: the
    capability (:data:`CAPABILITIES`) a model must declare for this engine to apply.

    :raises ValueError: for particle counts out of order, estimators without ``reparam`` or
        unknown, or an unknown capability.
    """

    name: str
    factory: Callable[..., pyro.infer.ELBO]
    description: str
    describe: Callable[[BoundSpec, int], str] | None = None
    parameter: Parameter | None = None
    estimators: tuple[str, ...] = ESTIMATORS
    min_particles: int = 1
    default_particles: int = 1
    requires: str | None = None

    def __post_init__(self) -> None:
        name = self.name.strip().lower()
        if not 1 <= self.min_particles <= self.default_particles:
            raise ValueError(
                f"engine {name!r}: need 1 <= min_particles <= default_particles, got "
                f"{self.min_particles}, {self.default_particles}"
            )
        if "reparam" not in self.estimators or set(self.estimators) - set(ESTIMATORS):
            raise ValueError(f"estimators must include 'reparam' and be among {ESTIMATORS}")
        if self.requires is not None and self.requires not in CAPABILITIES:
            raise ValueError(
                f"requires must be one of {', '.join(CAPABILITIES)}, got {self.requires!r}"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "estimators", tuple(self.estimators))


ENGINES: Registry[EngineEntry] = Registry("engine")


def register_engine(
    name: str, factory: Callable[..., pyro.infer.ELBO], description: str, **declared: Any
) -> EngineEntry:
    """Register an engine given by its parts (the fields of :class:`EngineEntry`); returns
    its entry.

    :raises ValueError: a name already taken, or as :class:`EngineEntry`.
    """
    return ENGINES.add(EngineEntry(name, factory, description, **declared))


def _parameter_engines() -> list[tuple[str, Parameter]]:
    """``(names, parameter)`` of the engines with a parameter, those sharing one syntax
    grouped (``miwae/piwae``, MxK)."""
    groups: dict[tuple[str, str], tuple[list[str], Parameter]] = {}
    for entry in ENGINES.entries():
        if (parameter := entry.parameter) is not None:
            key = (parameter.syntax, parameter.help)
            groups.setdefault(key, ([], parameter))[0].append(entry.name)
    return [("/".join(names), parameter) for names, parameter in groups.values()]


def bound_grammar() -> str:
    """The bound grammar, from the registered engines."""
    parameters = "; ".join(f"{n} {p.syntax} ({p.help})" for n, p in _parameter_engines())
    return (
        f"NAME[-stl|-dreg][:PARAMETER]: NAME one of {', '.join(ENGINES.names())}; -stl/-dreg "
        f"the guide's gradient estimator; PARAMETER: {parameters or 'none'}; e.g. iwae-dreg, "
        "miwae:8x8, ciwae:0.5"
    )


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

    def with_values(self, values: Mapping[str, Any]) -> BoundSpec:
        """This spec with the parameter ``values``."""
        return dataclasses.replace(self, values=tuple(sorted(values.items())))

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
        return self.with_values(entry.parameter.resolve(self.name, particles, self.options, inner))

    def build(self, particles: int, inner: int | None = None) -> pyro.infer.ELBO:
        """The engine, with ``particles`` samples of z per datapoint.

        :raises ValueError: as :meth:`resolve`.
        """
        spec = self.resolve(particles, inner)
        return self.engine.factory(particles, estimator=spec.estimator, **spec.options)

    def describe(self, particles: int) -> str:
        """What this (resolved) bound trains, in words, e.g. ``MIWAE(M=8, K=8), DREG``."""
        describe = self.engine.describe
        text = describe(self, particles) if describe else f"{self.name.upper()}_{particles}"
        return text if self.estimator == "reparam" else f"{text}, {self.estimator.upper()}"


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
        takes = "; ".join(f"{names} {p.syntax}" for names, p in _parameter_engines())
        raise ValueError(
            f"bound {text!r}: {entry.name} takes no parameter (its K is --particles); "
            f"parameters: {takes}"
        )
    try:
        return spec.with_values(entry.parameter.parse(parameter))
    except ValueError as error:
        raise ValueError(f"bound {text!r}: {entry.name} takes {error}") from None


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


# -- the engines of pvae.inference (imported when one is built) --------------------------------


def _elbo(particles: int, estimator: str = "reparam") -> pyro.infer.ELBO:
    from pvae.inference import ELBO, MIWAE

    if estimator == "reparam":
        return ELBO(num_particles=particles)
    return MIWAE(particles, 1, estimator=estimator)  # the P-sample ELBO, Monte-Carlo KL


def _iwae(particles: int, estimator: str = "reparam") -> pyro.infer.ELBO:
    from pvae.inference import IWAE

    return IWAE(num_particles=particles, estimator=estimator)


def _grouped(engine: str) -> Callable[..., pyro.infer.ELBO]:
    def factory(particles: int, estimator: str = "reparam", outer: int = 1, inner: int = 1):
        return getattr(importlib.import_module("pvae.inference"), engine)(
            outer, inner, estimator=estimator
        )

    return factory


def _ciwae(particles: int, estimator: str = "reparam", beta: float = 0.5) -> pyro.infer.ELBO:
    from pvae.inference import CIWAE

    return CIWAE(num_particles=particles, beta=beta, estimator=estimator)


def _kalman(particles: int, estimator: str = "reparam") -> pyro.infer.ELBO:
    from pvae.inference import KalmanELBO

    return KalmanELBO(num_particles=particles)


def _parse_split(text: str) -> dict[str, Any]:
    outer, x, inner = text.partition("x")
    if x and outer.isdigit() and inner.isdigit() and int(outer) > 0 and int(inner) > 0:
        return {"outer": int(outer), "inner": int(inner)}
    raise ValueError("MxK with positive integers, e.g. 8x8")


def _resolve_split(
    name: str, particles: int, values: Mapping[str, Any], inner: int | None
) -> dict[str, Any]:
    m, k = split_particles(name, particles, values.get("outer"), values.get("inner", inner))
    return {"outer": m, "inner": k}


def _parse_beta(text: str) -> dict[str, Any]:
    try:
        beta = float(text)
    except ValueError:
        beta = math.nan
    if not 0.0 <= beta <= 1.0:
        raise ValueError("BETA in [0, 1], e.g. ciwae:0.5")
    return {"beta": beta}


GROUP_SPLIT = Parameter(
    "MxK",
    "M groups of K particles, M*K = --particles",
    _parse_split,
    _resolve_split,
    lambda values: f"{values['outer']}x{values['inner']}",
    lambda values: values["outer"] * values["inner"] if {"outer", "inner"} <= set(values) else None,
)
BETA = Parameter(
    "BETA",
    "in [0, 1], the weight of the ELBO; default 0.5",
    _parse_beta,
    lambda name, particles, values, inner: {"beta": values.get("beta", 0.5)},
    lambda values: f"{values['beta']:g}",
)


def _describe_grouped(spec: BoundSpec, particles: int) -> str:
    return f"{spec.name.upper()}(M={spec.options.get('outer')}, K={spec.options.get('inner')})"


register_engine(
    "elbo",
    _elbo,
    "evidence lower bound (Kingma & Welling 2014)",
    describe=lambda spec, particles: (
        f"ELBO, {particles} samples averaged"
        + (" (Monte-Carlo KL)" if spec.estimator != "reparam" else "")
    ),
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
    _grouped("MIWAE"),
    "average of M IWAE_K bounds (Rainforth et al. 2018)",
    describe=_describe_grouped,
    parameter=GROUP_SPLIT,
    default_particles=64,
)
register_engine(
    "ciwae",
    _ciwae,
    "beta * ELBO + (1 - beta) * IWAE (Rainforth et al. 2018)",
    describe=lambda spec, particles: f"CIWAE_{particles}, beta={spec.options.get('beta', 0.5):g}",
    parameter=BETA,
    min_particles=2,
    default_particles=64,
)
register_engine(
    "piwae",
    _grouped("PIWAE"),
    "model follows IWAE_MK, guide MIWAE(M, K) (Rainforth et al. 2018)",
    describe=_describe_grouped,
    parameter=GROUP_SPLIT,
    default_particles=64,
)
register_engine(
    "kalman",
    _kalman,
    "ELBO with the exact Kalman KL and linear-Gaussian expectations (state-space pairs)",
    describe=lambda spec, particles: f"KalmanELBO, {particles} smoothed draws",
    estimators=("reparam",),
    requires="state-space",
)

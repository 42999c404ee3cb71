"""Name -> factory registries for the command line: models and engines (bounds).

The CLI looks models and engines up by name here (datasets are a registry of their own, in
:mod:`pvae.data`)::

    from pvae.registry import ENGINES, MODELS, parse_bound
    ds = pvae.data.load("digits")
    vae = MODELS["vae"](ds, z_dim=20, hidden=(200, 200), net="mlp", likelihood="bernoulli")
    engine = ENGINES["elbo"](1)                      # factory(particles, **options)
    engine = parse_bound("miwae-dreg:8x8").build(64)  # MIWAE(8, 8, estimator="dreg")

Engines and their particle budget: every engine gets ``particles`` = P samples of z per
datapoint, so bounds compared "with 64 particles" cost the same per step:

- ``elbo``: ELBO(num_particles=P), the P-sample average (analytic KL where registered);
- ``iwae``: IWAE(num_particles=P), IWAE_P;
- ``miwae``: MIWAE(M, K) with M*K = P (default M = K = sqrt(P); ``inner=K`` picks K);
- ``ciwae``: CIWAE(num_particles=P, beta), beta = 0.5 unless given;
- ``piwae``: PIWAE(M, K) with M*K = P, as for miwae (the model follows IWAE_P, the guide
  MIWAE(M, K)).

Bounds are written on the command line in a small grammar (:data:`BOUND_GRAMMAR`,
:func:`parse_bound`)::

    BOUND := NAME [ "-" ESTIMATOR ] [ ":" PARAMETER ]
    NAME       elbo | iwae | miwae | ciwae | piwae
    ESTIMATOR  stl | dreg   (the guide's gradient estimator; default: reparameterised)
    PARAMETER  MxK for miwae and piwae (M*K must equal the particle budget), BETA in [0, 1]
               for ciwae (the weight of the ELBO)

e.g. ``elbo``, ``iwae-dreg``, ``miwae:8x8``, ``ciwae:0.5``, ``piwae-stl:4x16``. ``elbo-stl``
(or ``-dreg``) is the P-sample ELBO as MIWAE(P, 1) with that estimator (Monte-Carlo KL).

Adding an engine is one line at the bottom of this file::

    ENGINES.add("iwae", _importance(IWAE), "importance-weighted bound (Burda et al. 2016)")

An unknown name raises :class:`UnknownName`, which is both a ``KeyError`` (so the registries
behave as read-only mappings) and a ``ValueError`` whose message lists the valid choices
(in registration order).

This module sits above models and engines in the dependency order (like the CLI): core
modules never import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import pyro
from pyro.nn import PyroModule

from pvae.data import Splits
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE
from pvae.models import VAE

__all__ = [
    "BOUND_GRAMMAR",
    "ENGINES",
    "MODELS",
    "BoundSpec",
    "EngineFactory",
    "ModelFactory",
    "Registry",
    "UnknownName",
    "parse_bound",
]

Factory = TypeVar("Factory", bound=Callable)


class UnknownName(KeyError, ValueError):
    """A name that is not in a registry; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class Entry(NamedTuple, Generic[Factory]):
    """One registered name: its factory and a one-line description."""

    name: str
    factory: Factory
    description: str


class Registry(Mapping[str, Factory]):
    """A read-only mapping ``name -> factory`` with descriptions, filled by :meth:`add`.

    :param kind: what the names name ("model", "engine"), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[Factory]] = {}

    def add(self, name: str, factory: Factory, description: str = "") -> Factory:
        """Register ``factory`` under ``name`` (lower case); returns the factory.

        :raises ValueError: if ``name`` is already registered.
        """
        key = name.strip().lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[key] = Entry(key, factory, description)
        return factory

    def register(self, name: str, description: str = "") -> Callable[[Factory], Factory]:
        """Decorator form of :meth:`add`."""

        def decorator(factory: Factory) -> Factory:
            return self.add(name, factory, description)

        return decorator

    def entries(self) -> list[Entry[Factory]]:
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

    def __getitem__(self, name: str) -> Factory:
        return self._entries[self.normalise(name)].factory

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# ---------------------------------------------------------------------------------------------
# Models: factory(ds, z_dim, hidden, net, likelihood) -> a PyroModule with model/guide
# ---------------------------------------------------------------------------------------------


class ModelFactory(Protocol):
    def __call__(
        self, ds: Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str
    ) -> PyroModule: ...


MODELS: Registry[ModelFactory] = Registry("model")


def _image_shape(ds: Splits, net: str) -> tuple[int, int, int] | None:
    if net != "conv":
        return None
    if ds.image_shape is None or len(ds.image_shape) != 3:
        raise ValueError(
            f"net 'conv' needs an image dataset; {ds.name!r} has no (channels, height, width) "
            "image_shape: use net 'mlp'"
        )
    channels, height, width = ds.image_shape
    return (channels, height, width)


@MODELS.register("vae", "variational autoencoder, Gaussian latents (Kingma & Welling 2014)")
def _vae(ds: Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str) -> VAE:
    if isinstance(ds.train, tuple):
        raise ValueError(
            f"dataset '{ds.name}' has several modalities; model 'vae' takes one: use "
            "pvae.models.MultimodalVAE from Python, or a single-modality dataset"
        )
    return VAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=_image_shape(ds, net),
    )


# ---------------------------------------------------------------------------------------------
# Engines: factory(particles, **options) -> a pyro.infer.ELBO
# ---------------------------------------------------------------------------------------------


class EngineFactory(Protocol):
    """``factory(particles, **options)``: an engine drawing ``particles`` samples of z per
    datapoint. Options (each factory takes those that apply to it, and rejects the others
    with a ValueError): ``estimator`` ("reparam", "stl", "dreg"), ``outer`` and ``inner``
    (M and K of miwae/piwae), ``beta`` (ciwae)."""

    def __call__(self, particles: int, **options: Any) -> pyro.infer.ELBO: ...


ENGINES: Registry[EngineFactory] = Registry("engine")

ESTIMATORS = ("reparam", "stl", "dreg")


def _no_options(name: str, options: dict[str, Any]) -> None:
    given = {key: value for key, value in options.items() if value is not None}
    if given:
        raise ValueError(f"{name} takes no {', '.join(sorted(given))}")


def _estimator(name: str, estimator: str | None) -> str:
    estimator = estimator or "reparam"
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r} for {name}; valid choices: {', '.join(ESTIMATORS)}"
        )
    return estimator


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


def _elbo(particles: int, estimator: str | None = None, **options: Any) -> pyro.infer.ELBO:
    _no_options("elbo", options)
    estimator = _estimator("elbo", estimator)
    if estimator == "reparam":
        return ELBO(num_particles=particles)
    return MIWAE(particles, 1, estimator=estimator)  # the P-sample ELBO, Monte-Carlo KL


def _iwae(particles: int, estimator: str | None = None, **options: Any) -> pyro.infer.ELBO:
    _no_options("iwae", options)
    return IWAE(num_particles=particles, estimator=_estimator("iwae", estimator))


def _grouped(name: str, engine: Callable[..., pyro.infer.ELBO]) -> EngineFactory:
    def factory(
        particles: int,
        estimator: str | None = None,
        outer: int | None = None,
        inner: int | None = None,
        **options: Any,
    ) -> pyro.infer.ELBO:
        _no_options(name, options)
        m, k = split_particles(name, particles, outer, inner)
        return engine(m, k, estimator=_estimator(name, estimator))

    factory.__name__ = factory.__qualname__ = f"_{name}"
    return factory


def _ciwae(
    particles: int, estimator: str | None = None, beta: float | None = None, **options: Any
) -> pyro.infer.ELBO:
    _no_options("ciwae", options)
    return CIWAE(
        num_particles=particles,
        beta=0.5 if beta is None else beta,
        estimator=_estimator("ciwae", estimator),
    )


ENGINES.add("elbo", _elbo, "evidence lower bound (Kingma & Welling 2014)")
ENGINES.add("iwae", _iwae, "importance-weighted bound IWAE_K (Burda et al. 2016)")
ENGINES.add("miwae", _grouped("miwae", MIWAE), "average of M IWAE_K bounds (Rainforth et al. 2018)")
ENGINES.add("ciwae", _ciwae, "beta * ELBO + (1 - beta) * IWAE (Rainforth et al. 2018)")
ENGINES.add(
    "piwae",
    _grouped("piwae", PIWAE),
    "model follows IWAE_MK, guide MIWAE(M, K) (Rainforth et al. 2018)",
)


# ---------------------------------------------------------------------------------------------
# Bound specifications: NAME[-ESTIMATOR][:PARAMETER]
# ---------------------------------------------------------------------------------------------

BOUND_GRAMMAR = (
    "NAME[-stl|-dreg][:PARAMETER]: NAME one of elbo, iwae, miwae, ciwae, piwae; -stl/-dreg "
    "the guide's gradient estimator; PARAMETER MxK for miwae/piwae (M*K = --particles) or "
    "BETA in [0, 1] for ciwae; e.g. iwae-dreg, miwae:8x8, ciwae:0.5"
)

_GROUPED = ("miwae", "piwae")


@dataclass(frozen=True)
class BoundSpec:
    """A parsed bound: engine ``name``, gradient ``estimator`` and its parameters (None: the
    engine's default, settled by :meth:`resolve` once the particle budget is known)."""

    name: str
    estimator: str = "reparam"
    outer: int | None = None
    inner: int | None = None
    beta: float | None = None

    @property
    def label(self) -> str:
        """The canonical spelling, e.g. ``miwae-dreg:8x8`` (parses back to this spec)."""
        text = self.name if self.estimator == "reparam" else f"{self.name}-{self.estimator}"
        if self.outer is not None and self.inner is not None:
            text += f":{self.outer}x{self.inner}"
        elif self.beta is not None:
            text += f":{self.beta:g}"
        return text

    def __str__(self) -> str:
        return self.label

    def resolve(self, particles: int, inner: int | None = None) -> BoundSpec:
        """This spec with its defaults filled in for a budget of ``particles`` per datapoint
        (``inner``: K for miwae/piwae written without MxK).

        :raises ValueError: when M*K does not equal ``particles``.
        """
        if self.name in _GROUPED:
            m, k = split_particles(
                self.name, particles, self.outer, self.inner if self.inner is not None else inner
            )
            return replace(self, outer=m, inner=k)
        if self.name == "ciwae" and self.beta is None:
            return replace(self, beta=0.5)
        return self

    def build(self, particles: int, inner: int | None = None) -> pyro.infer.ELBO:
        """The engine, with ``particles`` samples of z per datapoint.

        :raises ValueError: when M*K does not equal ``particles``.
        """
        spec = self.resolve(particles, inner)
        options: dict[str, Any] = {"estimator": spec.estimator}
        if spec.name in _GROUPED:
            options.update(outer=spec.outer, inner=spec.inner)
        if spec.name == "ciwae":
            options["beta"] = spec.beta
        return ENGINES[spec.name](particles, **options)


def _parse_parameter(name: str, parameter: str, text: str) -> dict[str, Any]:
    if name in _GROUPED:
        outer, x, inner = parameter.partition("x")
        if x and outer.isdigit() and inner.isdigit() and int(outer) > 0 and int(inner) > 0:
            return {"outer": int(outer), "inner": int(inner)}
        raise ValueError(f"bound {text!r}: {name} takes MxK with positive integers, e.g. 8x8")
    if name == "ciwae":
        try:
            beta = float(parameter)
        except ValueError:
            beta = math.nan
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"bound {text!r}: ciwae takes BETA in [0, 1], e.g. ciwae:0.5")
        return {"beta": beta}
    raise ValueError(
        f"bound {text!r}: {name} takes no parameter (its K is --particles); "
        "MxK is for miwae and piwae, BETA for ciwae"
    )


def parse_bound(text: str) -> BoundSpec:
    """Parse ``NAME[-ESTIMATOR][:PARAMETER]`` (see :data:`BOUND_GRAMMAR`).

    :raises ValueError: naming the valid choices.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty bound; valid choices: {', '.join(ENGINES.names())}")
    head, colon, parameter = text.strip().lower().partition(":")
    name, dash, estimator = head.partition("-")
    if name not in ENGINES:
        raise UnknownName(
            f"unknown bound {text!r}; valid choices: {', '.join(ENGINES.names())} "
            f"(grammar: {BOUND_GRAMMAR})"
        )
    name = ENGINES.normalise(name)
    if dash and estimator not in ("stl", "dreg", "reparam"):
        raise ValueError(
            f"bound {text!r}: unknown estimator {estimator!r}; valid choices: stl, dreg "
            "(the default is the reparameterised gradient)"
        )
    options = _parse_parameter(name, parameter, text) if colon else {}
    return BoundSpec(name, estimator if dash else "reparam", **options)

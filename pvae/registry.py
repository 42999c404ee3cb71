"""Name -> factory registries for the command line: models and engines.

The CLI looks models and engines up by name here (datasets are a registry of their own, in
:mod:`pvae.data`)::

    from pvae.registry import ENGINES, MODELS
    ds = pvae.data.load("digits")
    vae = MODELS["vae"](ds, z_dim=20, hidden=(200, 200), net="mlp", likelihood="bernoulli")
    engine = ENGINES["elbo"](particles=1)

Adding an engine is one line at the bottom of this file::

    ENGINES.add("iwae", _with_particles(IWAE), "importance-weighted bound (Burda et al. 2016)")

An unknown name raises :class:`UnknownName`, which is both a ``KeyError`` (so the registries
behave as read-only mappings) and a ``ValueError`` whose message lists the valid choices.

This module sits above models and engines in the dependency order (like the CLI): core
modules never import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import pyro
from pyro.nn import PyroModule

from pvae.data import Splits
from pvae.inference import ELBO
from pvae.models import VAE

__all__ = ["ENGINES", "MODELS", "EngineFactory", "ModelFactory", "Registry", "UnknownName"]

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
        """Every entry, sorted by name."""
        return [self._entries[name] for name in sorted(self._entries)]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

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
    return VAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=_image_shape(ds, net),
    )


# ---------------------------------------------------------------------------------------------
# Engines: factory(particles) -> a pyro.infer.ELBO
# ---------------------------------------------------------------------------------------------

EngineFactory = Callable[[int], pyro.infer.ELBO]

ENGINES: Registry[EngineFactory] = Registry("engine")


def _with_particles(engine: Callable[..., pyro.infer.ELBO]) -> EngineFactory:
    """``particles -> engine(num_particles=particles)``, for engines whose only CLI knob is K."""

    def factory(particles: int) -> pyro.infer.ELBO:
        return engine(num_particles=particles)

    factory.__name__ = factory.__qualname__ = f"{getattr(engine, '__name__', 'engine')}_factory"
    return factory


ENGINES.add("elbo", _with_particles(ELBO), "evidence lower bound (Kingma & Welling 2014)")

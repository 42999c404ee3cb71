"""The cases of the contract suite: every model registered in :data:`pvae.app.registry.MODELS`
(built by its registration, at tiny sizes, on a small dataset of the first kind it accepts) and
hand-written Pyro pairs (``nn.Module`` networks registered with ``pyro.module``).

A new model family gets the contract by registering: :func:`zoo_case` reads the registration
(the data kinds it accepts, its ``prepare``, its factory with default options) and nothing
else. Which engines apply is read from the pair's traces, never from its name:

- a pair whose model has latent sites only outside ``pyro.plate("data")`` (global weights) is
  a *sampler* pair: :class:`pvae.inference.SGHMC` through :func:`pvae.sample`;
- any other pair is *variational*: every engine of ``engine_cases.ENGINES``, and
  :class:`pvae.inference.KalmanELBO` too when a guide site is drawn from a
  :class:`pvae.distributions.KalmanSmoothedPosterior`.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pvae import data
from pvae.app.registry import MODELS
from pvae.app.runs import subset
from pvae.distributions import KalmanSmoothedPosterior
from pvae.evaluate import as_tensors

__all__ = ["CASES", "Case", "DATA_FOR_KIND", "HAND_WRITTEN", "as_float64", "zoo_case"]

TESTS = Path(__file__).resolve().parents[1]

# kind -> (dataset, loader keywords, training points); the CLI runs use the same names.
DATA_FOR_KIND: dict[str, tuple[str, dict[str, Any], int]] = {
    "images": ("digits", {"binarize": "static"}, 24),
    "vectors": ("linear-gaussian", {}, 24),
    "multimodal": ("digits-labels", {"binarize": "static"}, 24),
    "sequences": ("lds", {"sizes": (12, 6, 6), "num_steps": 8}, 12),
    "multimodal-sequences": ("mm-gp-sim", {"sizes": (8, 4, 4), "num_steps": 8}, 8),
}
Z_DIM, HIDDEN = 2, (8,)


@dataclass(frozen=True)
class Case:
    """One pair under contract.

    :param name: the test id (the registered name for zoo models).
    :param build: a fresh instance: an ``nn.Module`` with ``model`` and ``guide`` methods.
    :param data: ``data()`` -> ``(train, valid)``, each a tuple of tensors (rows first).
    :param registered: the name in ``MODELS`` (None for a hand-written pair).
    :param own_names: True when two live instances register their parameters under different
        names (the zoo); False for a pair whose ``pyro.module`` names are fixed (as Pyro's
        examples write them): a second instance must then be refused while the first one's
        parameters sit in Pyro's store.
    """

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
    registered: str | None = None
    own_names: bool = True

    def callbacks(self, pair: nn.Module) -> list[Callable]:
        """The ``pvae.fit`` callbacks the pair trains with (its registration's, as the CLI)."""
        if self.registered is None or MODELS[self.registered].callbacks is None:
            return []
        return list(MODELS[self.registered].callbacks(pair, _prepared(self.registered)))

    def __str__(self) -> str:
        return self.name


# ---- the zoo -----------------------------------------------------------------------------------


@functools.cache
def _dataset(kind: str) -> data.Splits:
    name, kwargs, n = DATA_FOR_KIND[kind]
    return subset(data.load(name, seed=0, **kwargs), n, max(2, n // 2))


@functools.cache
def _prepared(model_name: str) -> data.Splits:
    entry = MODELS[model_name]
    return entry.dataset_for(_dataset(entry.accepts[0]), entry.resolve_options())


def _zoo_data(model_name: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    ds = _prepared(model_name)
    return tuple(as_tensors(ds.train)), tuple(as_tensors(ds.valid))


def _zoo_build(model_name: str) -> nn.Module:
    entry = MODELS[model_name]
    return entry.build(_prepared(model_name), Z_DIM, HIDDEN, "mlp", None)


def zoo_case(model_name: str) -> Case:
    """The case of a registered model: its registration's factory, default options."""
    return Case(
        model_name,
        functools.partial(_zoo_build, model_name),
        functools.partial(_zoo_data, model_name),
        registered=model_name,
    )


# ---- hand-written pairs ------------------------------------------------------------------------


class PrefixedPair(nn.Module):
    """A user's Gaussian VAE in plain Pyro: ``nn.Linear`` networks registered with
    ``pyro.module`` under a name unique to the instance (``prefix``), so two live instances
    own their parameters. ``x (batch, x_dim)`` real-valued."""

    _count = itertools.count()

    def __init__(self, x_dim: int = 10, z_dim: int = Z_DIM, hidden: int = 8):
        super().__init__()
        self.prefix = f"user_pair_{next(self._count)}"
        self.z_dim = z_dim
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim)
        )
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim))
        self.log_noise = nn.Parameter(torch.zeros(()))  # a learned scale: a model parameter

    def model(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.prefix}.decoder", self.decoder)
        log_noise = pyro.param(f"{self.prefix}.log_noise", self.log_noise)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), log_noise.exp()).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.prefix}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def _vectors() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    ds = _dataset("vectors")
    return (ds.train,), (ds.valid,)


def _images() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    ds = _dataset("images")
    return (ds.train,), (ds.valid,)


@functools.cache
def _pyro_examples() -> Any:
    """tests/clients/pyro_examples.py, the pairs written as Pyro's own examples write them."""
    path = TESTS / "clients" / "pyro_examples.py"
    spec = importlib.util.spec_from_file_location("contract_pyro_examples", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyro_example_vae() -> nn.Module:
    return _pyro_examples().VAE(z_dim=Z_DIM, hidden_dim=8)


HAND_WRITTEN = [
    Case("user-prefixed-pair", PrefixedPair, _vectors),
    Case("pyro-example-vae", _pyro_example_vae, _images, own_names=False),
]

CASES = [zoo_case(name) for name in MODELS] + HAND_WRITTEN


# ---- what a pair is ----------------------------------------------------------------------------


def _unwrap(fn: Any) -> Any:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def latent_sites(pair: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, bool]:
    """``{latent site of the model: inside pyro.plate("data")}`` from one blocked model run."""
    with poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(pair.model).get_trace(*batch)
    return {
        name: any(frame.name == "data" for frame in site["cond_indep_stack"])
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def is_sampler_pair(pair: nn.Module, batch: tuple[torch.Tensor, ...]) -> bool:
    """Global latents only: sampled by SGHMC, not trained by a variational engine."""
    sites = latent_sites(pair, batch)
    return bool(sites) and not any(sites.values())


def has_kalman_guide(pair: nn.Module, batch: tuple[torch.Tensor, ...]) -> bool:
    """A guide site drawn from a KalmanSmoothedPosterior (KalmanELBO applies)."""
    with poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(pair.guide).get_trace(*batch)
    return any(
        isinstance(_unwrap(site["fn"]), KalmanSmoothedPosterior)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )


def as_float64(values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Floating tensors in float64; masks and counts as they are."""
    return tuple(v.double() if v.is_floating_point() else v for v in values)

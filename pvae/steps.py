"""What the training loop and every engine share: the per-step record, the engine-state
interface, and the one dispatch from an engine to a training step.

Engines come in two families, siblings as Pyro keeps ``ELBO`` apart from ``MCMCKernel``:

- **variational engines** (``pyro.infer.ELBO`` subclasses) take a gradient step on a bound:
  their record carries ``loss`` (the surrogate minimised) and ``bound`` (the value reported:
  nats for the full data set, per-datapoint terms counted N/B times);
- **sampler engines** (stochastic-gradient MCMC such as SGHMC) move a chain: their record
  carries ``loss`` (the negative log joint or the energy the step follows) and ``log_joint``
  (``bound`` None).

Both return a :class:`StepRecord` from ``train_step(model, guide, *args, **kwargs)`` (the
:class:`StepEngine` protocol; a sampler engine declares its whole contract by subclassing
:class:`SamplerEngine`) and put what must survive a checkpoint (step counter, schedules, a
sample bank) through :class:`EngineState`. Every engine declares the settings a resumed run
must share with the run it continues (``settings()``, read through :func:`engine_settings`).
Any other ``pyro.infer.ELBO`` (Pyro's own ``Trace_ELBO``, ``TraceMeanField_ELBO``,
``RenyiELBO``, ``JitTrace_ELBO`` ...) trains through its ``loss_and_grads``: its negative loss
stands in for the bound, and the record says so (``extras["bound_source"] == "negative
loss"``).

This module is core: it imports no engine.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from pvae.protocol import DATA_PLATE

ENGINE_BOUND = "engine"
"""``bound_source`` when the engine reports its bound itself."""
NEGATIVE_LOSS = "negative loss"
"""``bound_source`` when the engine reports only a loss, whose negative stands in for a bound."""


@dataclass(slots=True)
class StepRecord:
    """What one training step reports.

    :param loss: the value the step minimised (a surrogate for some engines; for Pyro's
        ``ELBO`` classes the negative ELBO estimate).
    :param bound: the bound itself (variational engines), in nats for the full data set; None
        for sampler engines.
    :param extras: engine-specific values (floats or strings); ``"bound_source"`` is
        ``"negative loss"`` where the bound is the negative loss of an engine that reports none.
    :param log_joint: log p(x, z) at the chain's current state (sampler engines); None for
        variational engines.
    """

    loss: float
    bound: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    log_joint: float | None = None


StepFunction = Callable[[Callable, Callable, tuple, dict], StepRecord]
"""``step(model, guide, args, kwargs) -> StepRecord``: gradients accumulated into ``.grad``."""


@runtime_checkable
class StepEngine(Protocol):
    """An engine that reports its own record: ``train_step`` computes the step's gradients
    (accumulated into the parameters' ``.grad``; the caller steps the optimiser) and returns
    the :class:`StepRecord`."""

    def train_step(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> StepRecord:
        """One step's gradients and its record."""
        ...


@runtime_checkable
class EngineState(Protocol):
    """What of an engine survives a checkpoint: its step counter, schedules, sample banks.

    ``state_dict()`` returns plain tensors and containers (checkpoints load with
    ``weights_only=True``); ``load_state_dict(state)`` restores it exactly; ``reset()`` returns
    the engine to its freshly constructed state, so that a reused engine object starts its
    schedules from zero.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def reset(self) -> None: ...


class SamplerEngine(abc.ABC):
    """The contract of a sampler engine (stochastic-gradient MCMC), as Pyro's ``MCMCKernel``
    declares a kernel's: :func:`pvae.sample` takes an instance of a subclass (or of a class
    registered with ``SamplerEngine.register``).

    A chain is started by :meth:`setup`, moved by :meth:`train_step`, read by :meth:`values`
    (and :meth:`unconstrained`, the state a checkpoint keeps), and checkpointed through
    :meth:`state_dict` / :meth:`load_state_dict` (:class:`EngineState`). :meth:`settings`
    names what a resumed run must share with the run it continues (none by default; a
    subclass returns its own, extending ``super().settings()``, e.g. with
    :func:`attribute_settings`).
    """

    data_plate: str = "data"
    """The name of the plate holding the datapoints (``pvae.sample`` sets it for its run)."""

    @abc.abstractmethod
    def setup(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        num_data: int = 1,
        num_warmup: int = 0,
        seed: int = 0,
    ) -> None:
        """Start a chain on ``model``: find its latent sites on the batch ``args``, draw their
        initial values. ``num_data``: N; ``num_warmup``: steps of warm-up; ``seed``: this
        chain's seed."""

    @abc.abstractmethod
    def train_step(
        self, model: Callable, guide: Any = None, *args: Any, **kwargs: Any
    ) -> StepRecord:
        """One move on the minibatch ``args``; the record carries ``log_joint``."""

    @abc.abstractmethod
    def values(self) -> dict[str, torch.Tensor]:
        """The current state: site name -> value in the site's support (the site's shape)."""

    @abc.abstractmethod
    def unconstrained(self) -> dict[str, torch.Tensor]:
        """The current state in unconstrained space, site name -> tensor."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to continue the chain bit-identically."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state (after :meth:`setup` on the same model)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the chain: :meth:`setup` must run again before the next step."""

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must match: ``{name: bool | int | float | str}``."""
        return {}


def missing_sampler_methods(sampler: Any) -> list[str]:
    """The methods of :class:`SamplerEngine`'s contract that ``sampler`` lacks."""
    return [
        name
        for name in sorted(SamplerEngine.__abstractmethods__)
        if not callable(getattr(sampler, name, None))
    ]


# -- settings a resume must match --------------------------------------------------------------

PLAIN = (bool, int, float, str)
"""The types a setting's value may take (checkpoints compare them with ``==``)."""

PYRO_ELBO_SETTINGS = (
    "num_particles",
    "vectorize_particles",
    "max_plate_nesting",
    "alpha",
    "tail_adaptive_beta",
)
"""The public attributes of Pyro's own ``ELBO`` classes that define their estimate."""


def attribute_settings(engine: Any, *names: str) -> dict[str, Any]:
    """``{name: engine.<name>}`` for the named attributes that hold a plain value; a frozen
    dataclass value (a schedule such as ``LinearAnnealing``) is described by its ``repr``;
    other values (functions) and missing attributes are left out. Engines build their
    ``settings()`` with it."""
    found: dict[str, Any] = {}
    for name in names:
        value = getattr(engine, name, None)
        if isinstance(value, PLAIN):
            found[name] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            if type(value).__dataclass_params__.frozen:  # type: ignore[attr-defined]
                found[name] = repr(value)
    return found


def pyro_elbo_settings(engine: Any) -> dict[str, Any]:
    """The settings of an engine without ``settings()`` (Pyro's own ``ELBO`` classes): the
    public attributes of :data:`PYRO_ELBO_SETTINGS` it has, with plain finite values."""
    found: dict[str, Any] = {}
    for name in PYRO_ELBO_SETTINGS:
        value = getattr(engine, name, None)
        if isinstance(value, PLAIN) and not (isinstance(value, float) and math.isinf(value)):
            found[name] = value
    return found


def engine_settings(engine: Any) -> dict[str, Any]:
    """``engine.settings()`` (checked: a dict of plain values by name), or
    :func:`pyro_elbo_settings` for an engine without that method.

    :raises TypeError: ``settings()`` returned something else.
    """
    method = getattr(engine, "settings", None)
    if not callable(method):
        return pyro_elbo_settings(engine)
    found = method()
    if not isinstance(found, Mapping) or not all(
        isinstance(key, str) and isinstance(value, PLAIN) for key, value in found.items()
    ):
        raise TypeError(
            f"{type(engine).__name__}.settings() must return a dict of name -> bool, int, "
            f"float or str, got {found!r}"
        )
    return dict(found)


# -- the data plate ----------------------------------------------------------------------------


@contextmanager
def engine_data_plate(engine: Any, data_plate: str) -> Iterator[None]:
    """While the block runs, ``engine`` reads the datapoints from the plate ``data_plate``
    (its ``data_plate`` attribute, restored afterwards). An engine without the attribute
    (Pyro's own ``ELBO`` classes: the loop's scaling of the plate is all they need) is left
    as it is.

    :raises ValueError: the engine was built for another plate than ``data_plate`` (not the
        default ``"data"``): the two must agree.
    """
    current = getattr(engine, "data_plate", None)
    if current is None or current == data_plate:
        yield
        return
    if current != DATA_PLATE:
        raise ValueError(
            f"the engine {type(engine).__name__} reads the plate {current!r} (its data_plate) "
            f"but the loop was given data_plate={data_plate!r}; pass the same name to both"
        )
    engine.data_plate = data_plate
    try:
        yield
    finally:
        engine.data_plate = current


def step_function(engine: Any) -> tuple[StepFunction, str]:
    """Resolve, once per training run, how ``engine`` takes a step.

    :returns: ``(step, bound_source)``: ``step(model, guide, args, kwargs)`` returns a
        :class:`StepRecord`; ``bound_source`` is ``"engine"`` or ``"negative loss"``.
    :raises TypeError: when ``engine`` has neither ``train_step`` nor ``loss_and_grads``.
    """
    method = getattr(engine, "train_step", None)
    if callable(method):

        def engine_step(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> StepRecord:
            return method(model, guide, *args, **kwargs)

        return engine_step, ENGINE_BOUND
    loss_and_grads = getattr(engine, "loss_and_grads", None)
    if callable(loss_and_grads):

        def loss_step(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> StepRecord:
            loss = float(loss_and_grads(model, guide, *args, **kwargs))
            return StepRecord(loss, -loss, {"bound_source": NEGATIVE_LOSS})

        return loss_step, NEGATIVE_LOSS
    raise TypeError(
        "engine must be a pyro.infer.ELBO (with loss_and_grads) or an engine with "
        f"train_step(model, guide, *args, **kwargs) -> StepRecord, got {type(engine).__name__}"
    )


def train_step(
    engine: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict | None = None
) -> StepRecord:
    """One step of ``engine`` on the pair: gradients into ``.grad``, the record returned.

    pvae engines return their own record; any other ``pyro.infer.ELBO`` reports
    ``bound = -loss`` with ``extras["bound_source"] == "negative loss"``. A loop resolves the
    dispatch once with :func:`step_function` instead of calling this per step.
    """
    return step_function(engine)[0](model, guide, args, kwargs or {})


# -- engine state ------------------------------------------------------------------------------


def engine_state(engine: Any) -> dict[str, Any]:
    """The engine's state for a checkpoint (``{}`` for an engine without state, such as
    Pyro's ``ELBO`` classes)."""
    state_dict = getattr(engine, "state_dict", None)
    return state_dict() if callable(state_dict) else {}


def snapshot_engine_state(engine: Any) -> dict[str, Any]:
    """A copy of the engine's state that later steps cannot change."""
    return copy.deepcopy(engine_state(engine))


def load_engine_state(engine: Any, state: Mapping[str, Any]) -> None:
    """Restore ``state`` (from :func:`engine_state`) into ``engine``; an empty state resets it."""
    if not state:
        reset_engine(engine)
        return
    load = getattr(engine, "load_state_dict", None)
    if not callable(load):
        raise ValueError(
            f"the checkpoint holds engine state {sorted(state)}, but {type(engine).__name__} "
            "has no load_state_dict; resume with the engine that wrote it"
        )
    load(state)


def reset_engine(engine: Any) -> None:
    """Start the engine's step counter and schedules from zero (a no-op without ``reset``)."""
    reset = getattr(engine, "reset", None)
    if callable(reset):
        reset()

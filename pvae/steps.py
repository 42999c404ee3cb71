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
:class:`StepEngine` protocol) and put what must survive a checkpoint (step counter, schedules,
a sample bank) through :class:`EngineState`. Any other ``pyro.infer.ELBO`` (Pyro's own
``Trace_ELBO``, ``TraceMeanField_ELBO``, ``RenyiELBO``, ``JitTrace_ELBO`` ...) trains through
its ``loss_and_grads``: its negative loss stands in for the bound, and the record says so
(``extras["bound_source"] == "negative loss"``).

This module is core: it imports no engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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

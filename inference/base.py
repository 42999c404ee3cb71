"""What every pvae engine shares: a ``pyro.infer.ELBO`` subclass that traces the pair with
vectorised particles and reports the bound itself.

An engine implements :meth:`Engine.objective`, returning the tensor to minimise (a surrogate
whose gradient is the estimator) and the bound (the value reported, never a surrogate).
Engines know nothing of models: only of the protocol in :mod:`pvae.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from pvae.protocol import (
    LogWeights,
    Reducer,
    find_data_frame,
    get_traces,
    guess_max_plate_nesting,
    log_weights,
)


class Engine(pyro.infer.ELBO):
    """Base class of pvae's variational engines.

    :param num_particles: particles drawn per datapoint.
    :param vectorize_particles: draw them with one vectorised run (default) or a loop.
    :param max_plate_nesting: guessed from a first run when omitted.

    After each call, ``last_record`` holds ``{"loss": objective value, "bound": bound}`` where
    the bound is the full-data value (per-datapoint terms scaled by N/B), and ``step`` counts
    the calls to :meth:`loss_and_grads`.
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
    ):
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(num_particles=int(num_particles), max_plate_nesting=max_plate_nesting)
        self.vectorize = vectorize_particles
        self.step = 0
        self.last_record: dict[str, float] = {}

    # -- state that must survive a checkpoint -----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    # -- tracing ------------------------------------------------------------------------------
    def _nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def traces(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int
    ) -> tuple[Trace, Trace, Reducer]:
        """One vectorised draw of ``num_particles`` particles and its reducer."""
        nesting = self._nesting(model, guide, args, kwargs)
        model_trace, guide_trace = get_traces(
            model, guide, args, kwargs, num_particles, nesting, vectorize=True
        )
        return model_trace, guide_trace, Reducer(nesting, find_data_frame(guide_trace, model_trace))

    def particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int
    ) -> list[tuple[Trace, Trace, Reducer]]:
        """``num_particles`` particles: one vectorised draw, or a loop of single draws."""
        if self.vectorize or num_particles == 1:
            return [self.traces(model, guide, args, kwargs, num_particles)]
        return [self.traces(model, guide, args, kwargs, 1) for _ in range(num_particles)]

    def log_weights(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        num_particles: int,
        detach_guide: bool = False,
    ) -> tuple[LogWeights, list[tuple[Trace, Trace, Reducer]]]:
        draws = self.particles(model, guide, args, kwargs, num_particles)
        parts = [log_weights(m, g, r, detach_guide) for m, g, r in draws]
        return (parts[0] if len(parts) == 1 else LogWeights.cat(parts)), draws

    def _get_trace(self, model, guide, args, kwargs):  # pyro.infer.ELBO's abstract hook
        model_trace, guide_trace, _ = self.traces(model, guide, args, kwargs, 1)
        return model_trace, guide_trace

    # -- the objective ------------------------------------------------------------------------
    def objective(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss_to_minimise, bound)`` as tensors."""
        raise NotImplementedError

    def _record(self, loss: torch.Tensor, bound: torch.Tensor) -> float:
        self.last_record = {"loss": float(loss), "bound": float(bound)}
        return -self.last_record["bound"]

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative bound, without gradients."""
        with torch.no_grad():
            loss, bound = self.objective(model, guide, args, kwargs)
        return self._record(loss, bound)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """The surrogate loss, differentiable (for ``pyro.infer.ELBOModule`` and custom loops)."""
        return self.objective(model, guide, args, kwargs)[0]

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Backpropagate the surrogate and return the negative bound (as ``Trace_ELBO`` does)."""
        loss, bound = self.objective(model, guide, args, kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        self.step += 1
        return self._record(loss.detach(), bound.detach())

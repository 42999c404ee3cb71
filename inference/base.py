"""What every pvae engine shares: a ``pyro.infer.ELBO`` subclass that traces the pair with
vectorised particles and reports the bound itself.

An engine implements :meth:`Engine.objective`, returning the tensor to minimise (a surrogate
whose gradient is the estimator) and the bound (the value reported, never a surrogate).
:meth:`Engine.train_step` returns both to the training loop as a :class:`pvae.steps.StepRecord`;
``loss_and_grads`` returns the negative bound, as Pyro's ``Trace_ELBO`` does. The step counter
(which drives beta schedules) is the engine's state (:class:`pvae.steps.EngineState`). An
engine whose model and guide parameters follow different objectives (PIWAE, DReG) returns a
:class:`SplitLoss` instead; which parameters belong to the guide is read from the traces.
Engines know nothing of models: only of the protocol in :mod:`pvae.protocol`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from pvae.potential import LightTrace, SiteRecorder, site_signature
from pvae.protocol import (
    PARTICLE_PLATE,
    SCALED_LATENTS,
    LogWeights,
    Reducer,
    batch_rows,
    check_data_plate,
    check_guide_covers_model,
    find_data_frame,
    get_traces,
    log_weights,
    plate_nesting,
    scaled_latent_sites,
    split_params,
    trace_pair,
    trace_params,
    used_by_guide,
    used_by_model,
)
from pvae.steps import StepRecord, attribute_settings
from pvae.validation import non_negative_int, plate_name, positive_int

ESTIMATORS = ("reparam", "stl", "dreg")
"""Every estimator of the guide's gradient (``estimator=``) an engine may take; each engine
class lists those it accepts in its ``estimators`` attribute (the ELBO: ``reparam`` and
``stl``, DReG of the ELBO being STL; the importance-weighted engines: all three)."""


@dataclass
class SplitLoss:
    """Two surrogates: ``model`` differentiated for the model's parameters only, ``guide`` for
    the guide's only. Ownership follows use (:func:`pvae.protocol.split_params`): a parameter
    is the guide's when the guide's latent sites use it and the model's densities do not use
    it directly, whoever registered it."""

    model: torch.Tensor
    guide: torch.Tensor
    model_params: list[torch.Tensor]
    guide_params: list[torch.Tensor]

    @staticmethod
    def from_draws(
        model_loss: torch.Tensor,
        guide_loss: torch.Tensor,
        draws: list,
        cache: dict | None = None,
    ) -> SplitLoss:
        """Split the parameters the draws' traces touched.

        The split is read from the autograd graph (a walk, no extra backward pass) once per
        parameter set: pass the same ``cache`` dict on every step (engines keep one) and later
        steps only look it up.
        Without gradients (``engine.loss``) nothing is split: there is no backward pass.
        """
        model_params: dict[str, torch.Tensor] = {}
        guide_params: dict[str, torch.Tensor] = {}
        for model_trace, guide_trace, _ in draws:
            model_params.update(trace_params(model_trace))
            guide_params.update(trace_params(guide_trace))
        params = {**guide_params, **model_params}
        key = tuple((name, id(p)) for name, p in params.items())
        cache = {} if cache is None else cache
        if key not in cache:
            if not torch.is_grad_enabled():
                return SplitLoss(model_loss, guide_loss, [], [])
            guide_uses = set().union(*(used_by_guide(g, params) for _, g, _ in draws))
            suspects = {n: params[n] for n in guide_uses if n in model_params}
            model_uses = set().union(*(used_by_model(m, g, suspects) for m, g, _ in draws))
            model, guide = split_params(model_params, guide_params, guide_uses, model_uses)
            cache[key] = (list(model), list(guide))
        model_names, guide_names = cache[key]
        return SplitLoss(
            model_loss,
            guide_loss,
            [params[n] for n in model_names],
            [params[n] for n in guide_names],
        )

    def backward(self) -> None:
        """Accumulate each surrogate's gradient into its own parameters' ``.grad``."""
        for loss, params in ((self.model, self.model_params), (self.guide, self.guide_params)):
            params = [p for p in params if p.requires_grad]
            if not params or not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                if grad is None:
                    continue
                param.grad = grad if param.grad is None else param.grad + grad


class Engine(pyro.infer.ELBO):
    """Base class of pvae's variational engines.

    :param num_particles: particles drawn per datapoint.
    :param vectorize_particles: draw the particles in one run of the pair under a vectorised
        particle plate (default: the pair's shapes must broadcast over a leading particle
        dimension), or one particle per run, in a loop (for pairs that cannot be vectorised:
        boolean-mask indexing, ``torch.cat`` of particle-dependent and per-datapoint tensors).
        Both give the same bound in expectation; the loop is slower.
    :param max_plate_nesting: guessed from a first run when omitted.
    :param data_plate: the name of the plate holding the datapoint dimension (``"data"``;
        Pyro's DMM example names it ``"z_minibatch"``). ``pvae.fit`` and the other loops set
        it for their run from their own ``data_plate=``; set it here when stepping the engine
        in ``pyro.infer.SVI`` yourself.

    :meth:`train_step` returns the step's :class:`~pvae.steps.StepRecord` (``loss``: the
    objective's value; ``bound``: the full-data bound, per-datapoint terms scaled by N/B);
    ``step`` counts the training steps (calls to :meth:`train_step` or
    :meth:`loss_and_grads`) and is the engine's checkpointed state. A step whose pair has
    latent sites with a scale of their own (:func:`pvae.protocol.scaled_latent_sites`) says so
    in its record (``extras["bound_source"] == "surrogate: scaled latent sites"``).
    :meth:`settings` names what a resumed run must share with the run it continues.
    """

    estimators: tuple[str, ...] = ("reparam",)
    """The estimators of the guide's gradient the engine takes (a subset of
    :data:`ESTIMATORS`)."""

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        data_plate: str = "data",
    ):
        num_particles = positive_int(num_particles, "num_particles")
        if not isinstance(vectorize_particles, bool):
            raise TypeError(
                f"vectorize_particles must be True or False, got {vectorize_particles!r}"
            )
        if max_plate_nesting != float("inf"):
            max_plate_nesting = non_negative_int(max_plate_nesting, "max_plate_nesting")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.vectorize = vectorize_particles
        self.data_plate = plate_name(data_plate)
        self.step = 0
        self.scaled_latents = False  # whether the last traces had latent sites of own scale
        # The plate nesting is read from the pair when not given, and is the pair's: it is
        # guessed again for another pair and after reset() (a reused engine must not carry one
        # pair's nesting to a pair with more plates).
        self._guess_nesting = max_plate_nesting == float("inf")
        self._pair: tuple[Any, Any] | None = None
        # The light-recorder path of traces() (off unless an engine turns it on): the last
        # checked draw's signature, data frame and scaled-latents flag; counters for tests.
        self.fast = False
        self._fast_state: tuple[tuple, Any, bool] | None = None
        self.fast_learns = 0
        self.fast_steps = 0

    # -- settings a resume must match ----------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues, by name (plain
        values, compared with ``==``; :func:`pvae.steps.engine_settings`). A subclass that
        adds a setting extends it::

            def settings(self):
                return {**super().settings(), **attribute_settings(self, "temperature")}
        """
        return attribute_settings(self, "num_particles")

    # -- state that must survive a checkpoint (pvae.steps.EngineState) ------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])

    def reset(self) -> None:
        """Back to step 0: schedules start again from their beginning; what was learnt about
        the last pair (its plate nesting, unless given, and its parameter split) is
        forgotten."""
        self.step = 0
        self._forget_pair()

    def _forget_pair(self) -> None:
        """Drop what was cached about the last pair traced (subclasses add their caches)."""
        self._pair = None
        self._fast_state = None
        if self._guess_nesting:
            self.max_plate_nesting = float("inf")

    # -- tracing ------------------------------------------------------------------------------
    def _nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
        pair = (_identity(model), _identity(guide))
        if pair != self._pair:  # another pair than the last one traced: forget the last one's
            self._forget_pair()
            self._pair = pair
        if self.max_plate_nesting == float("inf"):  # the first call: look at the pair once
            model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
            check_guide_covers_model(model_trace, guide_trace, type(self).__name__)
            self.max_plate_nesting = plate_nesting(model_trace, guide_trace)
        return int(self.max_plate_nesting)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pair"] = None  # weak references do not pickle; the pair is traced again
        state["_fast_state"] = None
        return state

    def traces(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int
    ) -> tuple[Trace, Trace, Reducer]:
        """One vectorised draw of ``num_particles`` particles and its reducer.

        With ``fast`` (an engine's option), once a draw of this pair has been traced and
        checked, later draws run the guide and the model under one light recorder each
        (:class:`pvae.potential.SiteRecorder`, in place of ``poutine.trace`` and
        ``poutine.replay``) and return :class:`pvae.potential.LightTrace` objects holding the
        same site messages; the checks (data plate, scaled latents) are redone only when the
        draw's :func:`pvae.potential.site_signature` differs from the last one checked."""
        nesting = self._nesting(model, guide, args, kwargs)
        if self.fast and self._fast_state is not None:
            light = self._light_traces(model, guide, args, kwargs, num_particles, nesting)
            if light is not None:
                return light
        model_trace, guide_trace = get_traces(
            model, guide, args, kwargs, num_particles, nesting, data_plate=self.data_plate
        )
        frame = self._check_traces(model_trace, guide_trace, args)
        if self.fast:
            signature = _pair_signature(
                num_particles, _sample_nodes(guide_trace), _sample_nodes(model_trace)
            )
            self._fast_state = (signature, frame, self.scaled_latents)
            self.fast_learns += 1
        return model_trace, guide_trace, Reducer(nesting, frame)

    def _light_traces(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        num_particles: int,
        nesting: int,
    ) -> tuple[Any, Any, Reducer] | None:
        """The draw of :meth:`traces` under :class:`pvae.potential.SiteRecorder`s; None when
        the pair raised (the caller then traces it, for the traced path's error messages)."""
        guide_recorder = SiteRecorder()
        model_recorder = SiteRecorder(
            replay=guide_recorder.nodes, subsamples=guide_recorder.subsamples
        )
        if num_particles > 1:
            plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1))
            guide, model = plate(guide), plate(model)
        try:
            with guide_recorder:
                guide(*args, **kwargs)
            with model_recorder:
                model(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError):
            self._fast_state = None
            return None
        guide_trace, model_trace = (
            LightTrace(guide_recorder.nodes),
            LightTrace(model_recorder.nodes),
        )
        signature = _pair_signature(num_particles, guide_trace.nodes, model_trace.nodes)
        assert self._fast_state is not None
        learned, frame, scaled = self._fast_state
        if signature == learned:
            self.scaled_latents = scaled
        else:  # another structure: check this draw as the traced path does, and learn it
            frame = self._check_traces(model_trace, guide_trace, args)
            self._fast_state = (signature, frame, self.scaled_latents)
            self.fast_learns += 1
        self.fast_steps += 1
        return model_trace, guide_trace, Reducer(nesting, frame)

    def _check_traces(self, model_trace: Any, guide_trace: Any, args: tuple) -> Any:
        """The data plate's frame (the plate rule checked when there is none); sets
        ``scaled_latents``."""
        plate = self.data_plate
        frame = find_data_frame(guide_trace, model_trace, plate=plate)
        if frame is None:  # the plate rule, only for pairs without a data plate
            check_data_plate(
                model_trace, guide_trace, batch_rows(args), type(self).__name__, plate=plate
            )
        self.scaled_latents = bool(scaled_latent_sites(model_trace, guide_trace, plate=plate))
        return frame

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
        fast, self.fast = self.fast, False  # Pyro's callers expect full traces
        try:
            model_trace, guide_trace, _ = self.traces(model, guide, args, kwargs, 1)
        finally:
            self.fast = fast
        return model_trace, guide_trace

    # -- the objective ------------------------------------------------------------------------
    def objective(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss_to_minimise, bound)`` as tensors."""
        raise NotImplementedError

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative bound, without gradients."""
        with torch.no_grad():
            bound = self.objective(model, guide, args, kwargs)[1]
        return -float(bound)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """The surrogate loss, differentiable (for ``pyro.infer.ELBOModule`` and custom loops)."""
        loss = self.objective(model, guide, args, kwargs)[0]
        if isinstance(loss, SplitLoss):
            raise NotImplementedError(
                f"{type(self).__name__} gives the model's and the guide's parameters different "
                "objectives, which one differentiable loss cannot express; train it with "
                "pyro.infer.SVI or pvae.fit (they call loss_and_grads)"
            )
        return loss

    def train_step(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> StepRecord:
        """Backpropagate the surrogate (into the parameters' ``.grad``), advance the step
        counter, and return the record: ``loss`` the objective's value, ``bound`` the bound."""
        loss, bound = self.objective(model, guide, args, kwargs)
        if isinstance(loss, SplitLoss):
            loss.backward()
            value = float(loss.model.detach()) + float(loss.guide.detach())
        else:
            if loss.requires_grad:
                loss.backward(retain_graph=self.retain_graph)
            value = float(loss.detach())
        self.step += 1
        # latent sites with a scale of their own: the "bound" is a weighted objective
        extras = {"bound_source": SCALED_LATENTS} if self.scaled_latents else {}
        return StepRecord(value, float(bound.detach()), extras)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Backpropagate the surrogate and return the negative bound (as ``Trace_ELBO`` does)."""
        return -self.train_step(model, guide, *args, **kwargs).bound  # type: ignore[operator]


def _sample_nodes(trace: Trace) -> dict[str, Any]:
    """The sample sites of a pruned trace, by name, in order."""
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def _pair_signature(num_particles: int, guide_nodes: Mapping, model_nodes: Mapping) -> tuple:
    """What a draw's structural checks depend on (:func:`pvae.potential.site_signature`)."""
    return (num_particles, site_signature(guide_nodes), site_signature(model_nodes))


def _identity(fn: Any) -> Any:
    """What identifies a model or guide between calls without keeping it alive: a weak
    reference (to the instance and the function of a bound method, which Python creates anew
    on every attribute access), or the object itself when it takes no weak reference."""
    if inspect.ismethod(fn):
        return (_identity(fn.__self__), fn.__func__)
    try:
        return weakref.ref(fn)
    except TypeError:
        return fn
